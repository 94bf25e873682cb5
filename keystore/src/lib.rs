//! hsmkms: a KMS that speaks the AWS KMS JSON protocol and keeps its root keys in PKCS#11 tokens.
//!
//! This crate knows KMS (key ids, ARNs, aliases, states, the ciphertext format, the fronts and the
//! CLI) and reaches the tokens only through the `hsm` crate's typed interface.

pub mod api;
pub mod app;
pub mod backup;
pub mod ciphertext;
pub mod client;
pub mod clock;
pub mod config;
pub mod context;
pub mod dev;
pub mod error;
pub mod ids;
pub mod intent;
pub mod key_stores;
pub mod listener;
pub mod metrics;
pub mod service;
pub mod sigv4;
pub mod store;
pub mod store_cli;
pub mod tde;
pub mod tls;
pub mod wire;
