//! Fuzz target bodies for tidepool; see `harness.rs`.

mod harness;

pub use harness::{client_framing, scram_exchange, server_messages, startup_packet};
