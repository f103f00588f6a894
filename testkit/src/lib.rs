//! Test infrastructure over real protocol peers, shared by the end-to-end tests in `cli/tests/`:
//! - [`s3`]: an S3 server (s3s-fs) on a loopback TCP port, started in-process;
//! - [`kafka`]: librdkafka's mock cluster (Kafka protocol over TCP) and topic inspection;
//! - [`pipeline`]: configuration and the pipeline roles (gateway, archiver, restorer) on ephemeral ports;
//! - [`python`]: the virtualenv with DuckDB and pyarrow installed by `scripts/setup-test-deps.sh`.

pub mod kafka;
pub mod pipeline;
pub mod python;
pub mod s3;
