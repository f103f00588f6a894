//! The ingest gateway: authenticates senders, validates and completes their events, produces them to Kafka
//! and answers only once Kafka acknowledged them.
//!
//! - [`error`]: what the gateway refuses and why, answered the same way by gRPC and the webhooks.
//! - [`producer`]: the idempotent Kafka producer and the mapping of its failures to retryable errors.
//! - [`grpc`]: the `chatvault.v1.IngestService` (unary, batch, client-streaming).
//! - [`server`]: the gRPC server with health, reflection and graceful shutdown.
//! - [`webhooks`]: the HTTP webhook endpoints (Slack, Standard Webhooks, Mattermost, Discord).

pub mod config;
pub mod error;
pub mod grpc;
pub mod producer;
pub mod server;
pub mod webhooks;

pub use grpc::IngestGrpc;
pub use producer::{AckCondition, EventProducer};
pub use server::{run, serve};
