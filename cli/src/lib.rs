//! capsad's client (`client`): the capsa CLI's, and the end-to-end suites'
//! way to the daemon's API.

pub mod client;
pub mod endpoint;
