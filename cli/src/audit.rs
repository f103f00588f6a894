//! `chatvault audit`: the audit trail of a tenant, from the restorer's `chatvault.v1.AuditService` (the
//! `audit` role). Pages through every matching record, oldest first, printing each as it arrives: one line
//! per record, with every caller-supplied text escaped so that nothing in it can start a line of its own, or
//! one JSON object per line with `--json`. A summary goes to stderr at the end.

use anyhow::Context;
use chatvault_archive::audit::{outcome_from_name, outcome_name};
use chatvault_core::audit::{AuditRecord, LogSafe};
use chatvault_core::time::parse_rfc3339_micros;
use chatvault_proto::v1::QueryAuditTrailRequest;
use chatvault_proto::v1::audit_service_client::AuditServiceClient;
use clap::Args;

use crate::client::{Connection, authorized, channel};

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    restorer: String,
    /// The tenant whose trail to read (needs the `audit` role for it).
    #[arg(long)]
    tenant: String,
    /// Only calls by this principal (a token's name or a JWT's subject).
    #[arg(long)]
    subject: Option<String>,
    /// Only this action, e.g. `chatvault.v1.RestoreService/GetConversation`.
    #[arg(long)]
    action: Option<String>,
    /// Only this outcome: allowed, denied or error.
    #[arg(long, value_parser = parse_outcome)]
    outcome: Option<String>,
    /// Records at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    from: Option<i64>,
    /// Records before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    to: Option<i64>,
    /// Stop after this many records.
    #[arg(long)]
    limit: Option<usize>,
    /// One JSON object per record instead of text lines.
    #[arg(long)]
    json: bool,
}

/// An RFC 3339 time argument, in microseconds since the epoch (shared by the commands that take times).
pub(crate) fn parse_time(text: &str) -> Result<i64, String> {
    parse_rfc3339_micros(text)
        .ok_or_else(|| format!("{text:?} is not an RFC 3339 time such as 2026-12-01T00:00:00Z"))
}

fn parse_outcome(text: &str) -> Result<String, String> {
    match outcome_from_name(text) {
        Some(_) if text != "unspecified" => Ok(text.to_string()),
        _ => Err(format!(
            "{text:?} is not an outcome: allowed, denied or error"
        )),
    }
}

/// Records asked for per page.
const PAGE_SIZE: u32 = 500;

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let token = args.connection.token().await?;
    let mut client = AuditServiceClient::new(channel(&args.restorer).await?);
    let mut request = QueryAuditTrailRequest {
        tenant_id: args.tenant.clone(),
        subject: args.subject.clone().unwrap_or_default(),
        action: args.action.clone().unwrap_or_default(),
        outcome: args
            .outcome
            .as_deref()
            .and_then(outcome_from_name)
            .map_or(0, |outcome| outcome as i32),
        from_micros: args.from.unwrap_or(0),
        to_micros: args.to.unwrap_or(0),
        page_size: PAGE_SIZE,
        page_token: String::new(),
    };
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut printed = 0usize;
    let mut pages = 0usize;
    'pages: loop {
        let response = client
            .query_audit_trail(authorized(request.clone(), &token)?)
            .await
            .map_err(|status| {
                anyhow::anyhow!(
                    "audit query failed: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })
            .context("reading the audit trail")?
            .into_inner();
        pages += 1;
        for record in &response.records {
            if printed == limit {
                break 'pages;
            }
            if args.json {
                println!("{}", serde_json::to_string(&record_json(record))?);
            } else {
                println!("{}", record_line(record));
            }
            printed += 1;
        }
        if response.next_page_token.is_empty() {
            break;
        }
        request.page_token = response.next_page_token;
    }
    eprintln!(
        "{printed} record(s) of tenant {} in {pages} page(s)",
        args.tenant
    );
    Ok(())
}

/// One readable line; caller-supplied text escaped (see [`LogSafe`]).
fn record_line(record: &AuditRecord) -> String {
    let mut line = format!(
        "{}  {:<7} {}  by {}",
        chatvault_restorer::render::format_time(record.time_micros),
        outcome_name(record.outcome),
        LogSafe(&record.action),
        LogSafe(if record.subject.is_empty() {
            "(unauthenticated)"
        } else {
            &record.subject
        }),
    );
    if !record.issuer.is_empty() {
        line.push_str(&format!(" via {}", LogSafe(&record.issuer)));
    }
    if !record.conversation_id.is_empty() {
        line.push_str(&format!(
            "  conversation {}",
            LogSafe(&record.conversation_id)
        ));
    }
    if !record.query.is_empty() {
        line.push_str(&format!("  query {}", LogSafe(&record.query)));
    }
    line.push_str(&format!(
        "  items {}  from {} ({})",
        record.item_count,
        LogSafe(&record.peer_address),
        LogSafe(&record.user_agent)
    ));
    if !record.reason.is_empty() {
        line.push_str(&format!("  reason: {}", LogSafe(&record.reason)));
    }
    line
}

fn record_json(record: &AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "record_id": record.record_id,
        "time_micros": record.time_micros,
        "service": record.service,
        "instance": record.instance,
        "action": record.action,
        "tenant_id": record.tenant_id,
        "conversation_id": record.conversation_id,
        "query": record.query,
        "from_micros": record.from_micros,
        "to_micros": record.to_micros,
        "peer_address": record.peer_address,
        "user_agent": record.user_agent,
        "outcome": outcome_name(record.outcome),
        "reason": record.reason,
        "subject": record.subject,
        "issuer": record.issuer,
        "client_id": record.client_id,
        "roles_used": record.roles_used,
        "item_count": record.item_count,
        "byte_count": record.byte_count,
    })
}
