//! Test infrastructure over real protocol peers, shared by the end-to-end tests in `cli/tests/`:
//! - [`s3`]: an S3 server (s3s-fs) on a loopback TCP port, started in-process;
//! - [`archive`]: reading an archive back and checking it holds every record exactly once;
//! - [`kafka`]: librdkafka's mock cluster (Kafka protocol over TCP) and topic inspection;
//! - [`otlp`]: an OTLP/gRPC collector that keeps the spans and metric names it receives;
//! - [`pipeline`]: configuration and the pipeline roles (gateway, archiver, restorer) on ephemeral ports;
//! - [`process`]: the `chatvault` binary as child processes (configuration files, SIGTERM, exit timing);
//! - [`proxy`]: a TCP proxy that freezes on demand, to make a real peer hang;
//! - [`fault_proxy`]: an HTTP proxy injecting S3 errors, latency and lost answers in front of the S3 server;
//! - [`kafka_proxy`]: a Kafka-protocol proxy that can answer fetches with a later record batch (a broker defect);
//! - [`broker`]: a Kafka broker (the mock cluster) in its own process, restartable, or an external one;
//! - [`graph`]: a stand-in for Microsoft Graph's Teams export API and the identity platform's token endpoint
//!   (nobody can run them here), serving the documented responses, errors and limits;
//! - [`oidc`]: a real OpenID provider (node-oidc-provider on Node.js) issuing JWT access tokens, and a person
//!   completing a device sign-in (RFC 8628) at it;
//! - [`moto`]: AWS KMS and S3 with Object Lock (moto's server) and [`softhsm`]: a PKCS#11 token (SoftHSM2), for the key providers;
//! - [`python`]: the virtualenv with DuckDB and pyarrow installed by `scripts/setup-test-deps.sh`.

pub mod archive;
pub mod broker;
pub mod fault_proxy;
pub mod graph;
pub mod kafka;
pub mod kafka_proxy;
pub mod moto;
pub mod oidc;
pub mod otlp;
pub mod pipeline;
pub mod process;
pub mod proxy;
pub mod python;
pub mod s3;
pub mod softhsm;
