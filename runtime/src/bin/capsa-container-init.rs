//! The container-init helper as a program of its own, for running the
//! runtime outside the agent (its tests). The agent runs the same code as
//! `capsa-agent container-init`.

fn main() {
    capsa_runtime::init::main()
}
