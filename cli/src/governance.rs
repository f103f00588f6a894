//! `chatvault policy` and `chatvault hold`: retention policies (the `policy` role) and legal holds (the `hold`
//! role) through the restorer's `chatvault.v1.GovernanceService`. Changes print the version they were
//! committed at; lists print one line per policy or hold (`--json`: the archive's JSON documents, one per
//! line). Every call is recorded in the audit trail by the restorer.

use anyhow::Context;
use chatvault_archive::disposition::explain::Explanation;
use chatvault_archive::governance::hold::LegalHold;
use chatvault_archive::governance::policy::PolicyRef;
use chatvault_archive::governance::policy::RetentionPolicy;
use chatvault_core::audit::LogSafe;
use chatvault_proto::v1::governance_service_client::GovernanceServiceClient;
use chatvault_proto::v1::{
    ExplainPolicyRequest, GovernanceChangeResponse, HoldRequest, ListHoldsRequest,
    ListPoliciesRequest, ReleaseHoldRequest, RemovePolicyRequest, SetPolicyRequest,
};
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use crate::audit::parse_time;
use crate::client::{Connection, authorized, channel};

#[derive(Args, Debug)]
pub struct Target {
    #[command(flatten)]
    pub(crate) connection: Connection,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    pub(crate) restorer: String,
    #[arg(long)]
    pub(crate) tenant: String,
    /// Machine-readable output: one JSON document per line.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Set a policy (a new id, or a new version of an existing one).
    Set(SetPolicyArgs),
    /// Remove a policy.
    Remove(RemoveArgs),
    /// List the tenant's policies.
    List(Target),
    /// Which policies and holds apply to one conversation, the precedence rules, and what they decide for
    /// its archived events.
    Explain(ExplainArgs),
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    target: Target,
    /// The conversation.
    conversation: String,
    /// Evaluate at this time (RFC 3339; default: now).
    #[arg(long, value_parser = parse_time)]
    as_of: Option<i64>,
}

#[derive(Args, Debug)]
struct SetPolicyArgs {
    #[command(flatten)]
    target: Target,
    /// The policy's id, `[a-z0-9][a-z0-9._-]{0,63}`.
    #[arg(long)]
    id: String,
    /// `tenant`, `workspace:<id>`, `conversation:<id>` or `label:<name>`.
    #[arg(long, default_value = "tenant")]
    scope: String,
    /// Keep events at least this long after they occurred: `<n>d` or `<n>y` (365 days).
    #[arg(long, value_parser = parse_days)]
    retain: Option<u32>,
    /// Delete events this long after they occurred (unless retained or held): `<n>d` or `<n>y`.
    #[arg(long, value_parser = parse_days)]
    delete_after: Option<u32>,
    #[arg(long, default_value = "")]
    description: String,
    /// Why (a ticket, a regulation); recorded with the change.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args, Debug)]
struct RemoveArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    id: String,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args, Debug)]
pub struct HoldArgs {
    #[command(subcommand)]
    command: HoldCommand,
}

#[derive(Subcommand, Debug)]
enum HoldCommand {
    /// Place a legal hold: nothing it covers is deleted or shredded until it is released.
    Place(PlaceHoldArgs),
    /// Replace what an unreleased hold covers.
    Change(PlaceHoldArgs),
    /// Release a hold.
    Release(RemoveArgs),
    /// List the tenant's holds with what they cover.
    List(ListHoldsArgs),
}

#[derive(Args, Debug)]
struct PlaceHoldArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    id: String,
    /// The matter it is for (required).
    #[arg(long)]
    matter: String,
    /// Only this conversation (repeatable).
    #[arg(long = "conversation")]
    conversations: Vec<String>,
    /// Only conversations this person took part in (repeatable).
    #[arg(long = "custodian")]
    custodians: Vec<String>,
    /// Only events at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    from: Option<i64>,
    /// Only events before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    to: Option<i64>,
    /// Only events whose text contains every word of this.
    #[arg(long, default_value = "")]
    query: String,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args, Debug)]
struct ListHoldsArgs {
    #[command(flatten)]
    target: Target,
    /// Also the released holds.
    #[arg(long)]
    all: bool,
}

fn parse_days(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a duration such as 30d or 7y");
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let count: u32 = number.parse().map_err(|_| bad())?;
    match unit {
        "d" => Ok(count),
        "y" => count.checked_mul(365).ok_or_else(bad),
        _ => Err(bad()),
    }
}

pub(crate) async fn client(
    target: &Target,
) -> anyhow::Result<(GovernanceServiceClient<Channel>, String)> {
    let token = target.connection.token().await?;
    Ok((
        GovernanceServiceClient::new(channel(&target.restorer).await?),
        token,
    ))
}

pub(crate) fn failed(what: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |status| anyhow::anyhow!("{what} failed: {:?}: {}", status.code(), status.message())
}

fn print_change(target: &Target, what: &str, response: GovernanceChangeResponse) {
    if target.json {
        println!("{}", response.record_json);
    } else {
        println!(
            "{what} (tenant {}, governance version {})",
            LogSafe(&target.tenant),
            response.version
        );
    }
}

pub async fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Set(args) => {
            let (mut client, token) = client(&args.target).await?;
            let request = SetPolicyRequest {
                tenant_id: args.target.tenant.clone(),
                policy_id: args.id.clone(),
                scope: args.scope.clone(),
                retain_days: args.retain.unwrap_or(0),
                delete_after_days: args.delete_after.unwrap_or(0),
                description: args.description.clone(),
                reason: args.reason.clone(),
            };
            let response = client
                .set_policy(authorized(request, &token)?)
                .await
                .map_err(failed("setting the policy"))?
                .into_inner();
            print_change(&args.target, &format!("policy {} set", args.id), response);
        }
        PolicyCommand::Remove(args) => {
            let (mut client, token) = client(&args.target).await?;
            let request = RemovePolicyRequest {
                tenant_id: args.target.tenant.clone(),
                policy_id: args.id.clone(),
                reason: args.reason.clone(),
            };
            let response = client
                .remove_policy(authorized(request, &token)?)
                .await
                .map_err(failed("removing the policy"))?
                .into_inner();
            print_change(
                &args.target,
                &format!("policy {} removed", args.id),
                response,
            );
        }
        PolicyCommand::Explain(args) => explain(args).await?,
        PolicyCommand::List(target) => {
            let (mut client, token) = client(&target).await?;
            let request = ListPoliciesRequest {
                tenant_id: target.tenant.clone(),
            };
            let response = client
                .list_policies(authorized(request, &token)?)
                .await
                .map_err(failed("listing the policies"))?
                .into_inner();
            for json in &response.policy_json {
                if target.json {
                    println!("{json}");
                } else {
                    let policy: RetentionPolicy =
                        serde_json::from_str(json).context("the restorer sent a bad policy")?;
                    println!(
                        "{}  set by {}",
                        LogSafe(&policy.describe()),
                        LogSafe(&policy.set_by)
                    );
                }
            }
            eprintln!(
                "{} policy(ies) of tenant {} at governance version {}",
                response.policy_json.len(),
                LogSafe(&target.tenant),
                response.version.map_or("none".into(), |v| v.to_string())
            );
        }
    }
    Ok(())
}

async fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let (mut client, token) = client(&args.target).await?;
    let request = ExplainPolicyRequest {
        tenant_id: args.target.tenant.clone(),
        conversation_id: args.conversation.clone(),
        as_of_micros: args.as_of.unwrap_or(0),
    };
    let response = client
        .explain_policy(authorized(request, &token)?)
        .await
        .map_err(failed("explaining"))?
        .into_inner();
    if args.target.json {
        println!("{}", response.explanation_json);
        return Ok(());
    }
    let explanation: Explanation = serde_json::from_str(&response.explanation_json)
        .context("the restorer sent a bad explanation")?;
    print!("{}", describe_explanation(&explanation));
    Ok(())
}

fn describe_explanation(explanation: &Explanation) -> String {
    let time = |micros: i64| chatvault_restorer::render::format_time(micros);
    let policy = |policy: &Option<PolicyRef>| {
        policy.as_ref().map_or(String::new(), |p| {
            format!(" by {}@{}", LogSafe(&p.policy_id), p.version)
        })
    };
    let mut out = format!(
        "conversation {} of tenant {} (workspace {}), as of {}, {} governance change(s)\n",
        LogSafe(&explanation.conversation_id),
        LogSafe(&explanation.tenant_id),
        LogSafe(if explanation.workspace_id.is_empty() {
            "unknown"
        } else {
            &explanation.workspace_id
        }),
        time(explanation.as_of_micros),
        explanation.governance_changes
    );
    match (
        explanation.first_event_micros,
        explanation.last_event_micros,
    ) {
        (Some(first), Some(last)) => out.push_str(&format!(
            "  {} archived event(s), {} to {}\n",
            explanation.events,
            time(first),
            time(last)
        )),
        _ => out.push_str("  no archived events\n"),
    }
    out.push_str("policies:\n");
    if explanation.policies.is_empty() {
        out.push_str("  none: everything is kept\n");
    }
    for application in &explanation.policies {
        out.push_str(&format!(
            "  {} {}: {}\n",
            if application.applies {
                "applies "
            } else {
                "does not"
            },
            LogSafe(&application.policy.describe()),
            LogSafe(&application.why)
        ));
    }
    out.push_str("precedence:\n");
    for rule in &explanation.precedence {
        out.push_str(&format!("  - {rule}\n"));
    }
    if let Some(oldest) = &explanation.oldest_event {
        out.push_str(&format!(
            "oldest event ({}): retained until {}{}; deletion {}{}; due {}{}\n",
            time(oldest.occurred_at_micros),
            oldest.retained_until_micros.map_or("-".into(), time),
            policy(&oldest.retained_by),
            oldest.delete_at_micros.map_or("never".into(), time),
            policy(&oldest.deleted_by),
            oldest.due_at_micros.map_or("never".into(), time),
            policy(&oldest.deciding_policy)
        ));
    }
    out.push_str(&format!(
        "now: {} event(s) due, {} due but kept by holds; next due {}\n",
        explanation.events_due,
        explanation.events_held,
        explanation.next_due_micros.map_or("never".into(), time)
    ));
    out.push_str("holds:\n");
    if explanation.holds.is_empty() {
        out.push_str("  none\n");
    }
    for hold in &explanation.holds {
        out.push_str(&format!(
            "  {} ({}): {}; covers {} of its event(s)\n",
            LogSafe(&hold.hold),
            LogSafe(&hold.matter),
            LogSafe(&hold.coverage),
            hold.events_covered
        ));
    }
    out
}

fn hold_request(args: &PlaceHoldArgs) -> HoldRequest {
    HoldRequest {
        tenant_id: args.target.tenant.clone(),
        hold_id: args.id.clone(),
        matter: args.matter.clone(),
        conversations: args.conversations.clone(),
        custodians: args.custodians.clone(),
        from_micros: args.from.unwrap_or(0),
        to_micros: args.to.unwrap_or(0),
        query: args.query.clone(),
        reason: args.reason.clone(),
    }
}

pub async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    match args.command {
        HoldCommand::Place(args) => {
            let (mut client, token) = client(&args.target).await?;
            let response = client
                .place_hold(authorized(hold_request(&args), &token)?)
                .await
                .map_err(failed("placing the hold"))?
                .into_inner();
            print_change(&args.target, &format!("hold {} placed", args.id), response);
        }
        HoldCommand::Change(args) => {
            let (mut client, token) = client(&args.target).await?;
            let response = client
                .change_hold(authorized(hold_request(&args), &token)?)
                .await
                .map_err(failed("changing the hold"))?
                .into_inner();
            print_change(&args.target, &format!("hold {} changed", args.id), response);
        }
        HoldCommand::Release(args) => {
            let (mut client, token) = client(&args.target).await?;
            let request = ReleaseHoldRequest {
                tenant_id: args.target.tenant.clone(),
                hold_id: args.id.clone(),
                reason: args.reason.clone(),
            };
            let response = client
                .release_hold(authorized(request, &token)?)
                .await
                .map_err(failed("releasing the hold"))?
                .into_inner();
            print_change(
                &args.target,
                &format!("hold {} released", args.id),
                response,
            );
        }
        HoldCommand::List(args) => {
            let (mut client, token) = client(&args.target).await?;
            let request = ListHoldsRequest {
                tenant_id: args.target.tenant.clone(),
                include_released: args.all,
            };
            let response = client
                .list_holds(authorized(request, &token)?)
                .await
                .map_err(failed("listing the holds"))?
                .into_inner();
            for listed in &response.holds {
                if args.target.json {
                    println!("{}", listed.hold_json);
                    continue;
                }
                let hold: LegalHold = serde_json::from_str(&listed.hold_json)
                    .context("the restorer sent a bad hold")?;
                let state = if hold.is_released() {
                    format!("released by {}", LogSafe(&hold.released_by))
                } else {
                    "active".to_string()
                };
                println!(
                    "{} v{} ({state}; placed by {}): {}: covers {}",
                    LogSafe(&hold.hold_id),
                    hold.version,
                    LogSafe(&hold.created_by),
                    LogSafe(&hold.matter),
                    LogSafe(&listed.coverage)
                );
            }
            eprintln!(
                "{} hold(s) of tenant {}",
                response.holds.len(),
                LogSafe(&args.target.tenant)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_days_or_years() {
        assert_eq!(parse_days("30d"), Ok(30));
        assert_eq!(parse_days("7y"), Ok(2555));
        assert!(parse_days("7w").unwrap_err().contains("30d or 7y"));
        assert!(parse_days("").is_err());
        assert!(parse_days("99999999999y").is_err());
    }
}
