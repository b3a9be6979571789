//! vsock packet header values (virtio spec 5.10.6).

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Largest payload accepted in one packet from the guest (Linux sends at
/// most 64 KiB per packet).
pub const MAX_PACKET_DATA: u32 = 64 * 1024;

/// A header-only packet the device owes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Host-side port (the packet's source).
    pub host_port: u32,
    /// Guest-side port (the packet's destination).
    pub guest_port: u32,
    pub op: u16,
    pub flags: u32,
}
