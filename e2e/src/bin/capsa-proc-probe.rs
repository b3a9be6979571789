//! The conformance suite's container process (see
//! capsa_e2e::suites::conformance::probe).

fn main() {
    capsa_e2e::suites::conformance::probe::main()
}
