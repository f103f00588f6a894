//! Delivery of imported events to the ingest gateway, over gRPC like any integration: every rule, limit,
//! authorization check and acknowledgement of live capture applies to history too.
//!
//! Events go in `IngestBatch` calls bounded by count and encoded size. A call is all-or-error, so the
//! outcome of each is one of:
//! - acknowledged: Kafka holds every event of it;
//! - retryable (UNAVAILABLE, RESOURCE_EXHAUSTED when the gateway sheds load, DEADLINE_EXCEEDED, ABORTED): the
//!   same call is repeated after an exponential backoff, until [`Gateway::max_retry_time`] has passed;
//! - INVALID_ARGUMENT naming `events[N].`: that event is rejected (reported with the gateway's reason) and
//!   the rest are sent again; when the reason is an oversized raw payload, the event is sent once more without
//!   it (the normalized fields are what restores need; the count is reported);
//! - a call too large for the gateway (OUT_OF_RANGE, or INVALID_ARGUMENT naming no event): it is split in
//!   halves;
//! - anything else (a refused token, a tenant the token may not ingest for): the import stops with the
//!   gateway's error.

use std::time::{Duration, Instant};

use chatvault_core::error::{Error, ErrorCode, Result};
use chatvault_proto::v1::ChatEvent;
use chatvault_proto::v1::IngestBatchRequest;
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use prost::Message;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// A rejected event: its position in what was given to [`Gateway::deliver`] and the gateway's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub reason: String,
}

/// What became of the events given to one [`Gateway::deliver`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Events Kafka acknowledged.
    pub acknowledged: u64,
    /// Events the gateway refused for good, with its reasons.
    pub refused: Vec<Refused>,
    /// Events acknowledged only after their raw payload was left out for being over the gateway's limit.
    pub raw_payloads_dropped: u64,
    /// Calls repeated after a retryable error.
    pub retries: u64,
}

/// An ingest gateway reached over gRPC with a token holding the `ingest` role.
pub struct Gateway {
    client: IngestServiceClient<Channel>,
    authorization: MetadataValue<Ascii>,
    /// Most events per call (the gateway's `max_batch_events` is 10,000 by default).
    pub max_batch_events: usize,
    /// Most encoded bytes per call (the gateway's `max_grpc_message_bytes` is 16 MiB by default).
    pub max_batch_bytes: usize,
    /// How long a call is retried before the import stops.
    pub max_retry_time: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("authorization", &"<redacted>")
            .field("max_batch_events", &self.max_batch_events)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .finish()
    }
}

impl Gateway {
    pub fn new(channel: Channel, token: &str) -> Result<Gateway> {
        Gateway::with_client(IngestServiceClient::new(channel), token)
    }

    /// Over an existing client (sharing its connection).
    pub fn with_client(client: IngestServiceClient<Channel>, token: &str) -> Result<Gateway> {
        let authorization = format!("Bearer {token}").parse().map_err(|_| {
            Error::invalid_argument("the token contains characters not allowed in a header")
        })?;
        Ok(Gateway {
            client,
            authorization,
            max_batch_events: 500,
            max_batch_bytes: 4 * 1024 * 1024,
            max_retry_time: Duration::from_secs(600),
        })
    }

    /// Delivers `events` in order; returns once every one was acknowledged or refused for good.
    pub async fn deliver(&mut self, events: Vec<ChatEvent>) -> Result<Delivery> {
        let mut delivery = Delivery::default();
        let mut batch: Vec<(usize, ChatEvent)> = Vec::new();
        let mut batch_bytes = 0;
        for (index, event) in events.into_iter().enumerate() {
            let size = event.encoded_len();
            if !batch.is_empty()
                && (batch.len() >= self.max_batch_events
                    || batch_bytes + size > self.max_batch_bytes)
            {
                self.send(std::mem::take(&mut batch), &mut delivery).await?;
                batch_bytes = 0;
            }
            batch_bytes += size;
            batch.push((index, event));
        }
        if !batch.is_empty() {
            self.send(batch, &mut delivery).await?;
        }
        Ok(delivery)
    }

    /// Sends one batch, handling every outcome in the module documentation.
    async fn send(
        &mut self,
        batch: Vec<(usize, ChatEvent)>,
        delivery: &mut Delivery,
    ) -> Result<()> {
        let mut pending = vec![batch];
        while let Some(mut batch) = pending.pop() {
            if batch.is_empty() {
                continue;
            }
            let started = Instant::now();
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut request = tonic::Request::new(IngestBatchRequest {
                    events: batch.iter().map(|(_, event)| event.clone()).collect(),
                });
                request
                    .metadata_mut()
                    .insert("authorization", self.authorization.clone());
                let status = match self.client.ingest_batch(request).await {
                    Ok(_) => {
                        delivery.acknowledged += batch.len() as u64;
                        break;
                    }
                    Err(status) => status,
                };
                match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted => {
                        if started.elapsed() >= self.max_retry_time {
                            return Err(Error::unavailable(format!(
                                "the gateway kept answering {:?} for {:?}: {}",
                                status.code(),
                                self.max_retry_time,
                                status.message()
                            )));
                        }
                        delivery.retries += 1;
                        tracing::debug!(code = ?status.code(), message = status.message(), "retrying an import batch");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    tonic::Code::InvalidArgument => match refused_index(status.message()) {
                        Some(position) if position < batch.len() => {
                            let reason = status.message().to_string();
                            let event = &mut batch[position].1;
                            if reason.contains("raw_payload") && !event.raw_payload.is_empty() {
                                event.raw_payload.clear();
                                event.raw_content_type.clear();
                                delivery.raw_payloads_dropped += 1;
                            } else {
                                let (index, _) = batch.remove(position);
                                delivery.refused.push(Refused { index, reason });
                                if batch.is_empty() {
                                    break;
                                }
                            }
                        }
                        _ if batch.len() > 1 => {
                            split_in_halves(batch, &mut pending);
                            break;
                        }
                        _ => {
                            let (index, _) = batch.remove(0);
                            delivery.refused.push(Refused {
                                index,
                                reason: status.message().to_string(),
                            });
                            break;
                        }
                    },
                    tonic::Code::OutOfRange if batch.len() > 1 => {
                        split_in_halves(batch, &mut pending);
                        break;
                    }
                    code => {
                        let code = match code {
                            tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
                            tonic::Code::PermissionDenied => ErrorCode::PermissionDenied,
                            _ => ErrorCode::Internal,
                        };
                        return Err(Error::new(
                            code,
                            format!(
                                "the gateway refused the import ({:?}): {}",
                                status.code(),
                                status.message()
                            ),
                        ));
                    }
                }
            }
        }
        // Refusals are reported in input order whatever order the halves were sent in.
        delivery.refused.sort_by_key(|refused| refused.index);
        Ok(())
    }
}

/// Queues `batch` as two halves, the first half to be sent first.
fn split_in_halves(mut batch: Vec<(usize, ChatEvent)>, pending: &mut Vec<Vec<(usize, ChatEvent)>>) {
    let second = batch.split_off(batch.len() / 2);
    pending.push(second);
    pending.push(batch);
}

/// The `N` of a gateway error about `events[N].<field>`.
fn refused_index(message: &str) -> Option<usize> {
    let start = message.find("events[")? + "events[".len();
    let end = start + message[start..].find("].")?;
    message[start..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_event_is_found_in_the_gateway_message() {
        assert_eq!(
            refused_index("events[12].text is 70000 bytes, over the limit of 65536"),
            Some(12)
        );
        assert_eq!(refused_index("events must not be empty"), None);
        assert_eq!(refused_index("events[x].text"), None);
    }
}
