//! Capsa's virtual machine monitor: boots a Linux kernel with a PVH entry
//! into a KVM microVM with an 8250 console, ACPI power-off and pvpanic.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
mod fds;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
mod vcpu;
pub mod virtio;
pub mod vm;

pub use vm::{run, ConsoleOutput, GuestExit, VmConfig, VmError, VmOutcome, REQUIRED_CMDLINE};
