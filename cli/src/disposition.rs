//! `chatvault retention` and `chatvault erase`: disposition plans and their application through the
//! restorer's `chatvault.v1.GovernanceService` (the `policy` role; every call is audited by the restorer).
//! A plan changes nothing and prints exactly what would go, per conversation with the deciding policy and
//! version; `apply --plan N` executes that plan and prints its signed report. `--json` prints the archive's
//! own documents.

use anyhow::Context;
use chatvault_archive::disposition::{DispositionReport, Plan, Purpose};
use chatvault_core::audit::LogSafe;
use chatvault_proto::v1::{
    ApplyDispositionRequest, ListDispositionsRequest, PlanDispositionRequest,
};
use clap::{Args, Subcommand};

use crate::audit::parse_time;
use crate::client::authorized;
use crate::governance::{Target, client, failed};

#[derive(Args, Debug)]
pub struct RetentionArgs {
    #[command(subcommand)]
    command: RetentionCommand,
}

#[derive(Subcommand, Debug)]
enum RetentionCommand {
    /// Plan what the tenant's retention policies make due (a dry run: nothing changes); prints the plan id.
    Plan(PlanArgs),
    /// Apply a plan by id: exactly its rows go, and a signed report is committed.
    Apply(ApplyArgs),
    /// The tenant's plans and reports.
    List(Target),
}

#[derive(Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    target: Target,
    /// Evaluate retention at this time (RFC 3339; default: now).
    #[arg(long, value_parser = parse_time)]
    as_of: Option<i64>,
    /// Apply the plan right after making it (scheduled disposition: what runs is still exactly the
    /// committed plan, and both are in the archive).
    #[arg(long)]
    apply: bool,
    /// Why (a ticket, the schedule); recorded in the plan and the report.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args, Debug)]
struct ApplyArgs {
    #[command(flatten)]
    target: Target,
    /// The plan's id (printed by `plan`).
    #[arg(long)]
    plan: u64,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args, Debug)]
pub struct EraseArgs {
    #[command(subcommand)]
    command: EraseCommand,
}

#[derive(Subcommand, Debug)]
enum EraseCommand {
    /// Plan the erasure of a data subject's events (nothing changes); held events are listed, not planned.
    Plan(ErasePlanArgs),
    /// Apply an erasure plan by id.
    Apply(ApplyArgs),
}

#[derive(Args, Debug)]
struct ErasePlanArgs {
    #[command(flatten)]
    target: Target,
    /// The data subject's user id.
    #[arg(long)]
    subject: String,
    /// Also erase other people's events that mention the subject.
    #[arg(long)]
    mentioning: bool,
    /// Only the events mentioning the subject, not those they authored (with --mentioning).
    #[arg(long)]
    not_authored: bool,
    #[arg(long, default_value = "")]
    reason: String,
}

pub async fn retention(args: RetentionArgs) -> anyhow::Result<()> {
    match args.command {
        RetentionCommand::Plan(args) => {
            let request = PlanDispositionRequest {
                tenant_id: args.target.tenant.clone(),
                as_of_micros: args.as_of.unwrap_or(0),
                reason: args.reason.clone(),
                ..PlanDispositionRequest::default()
            };
            let plan_id = plan(&args.target, request).await?;
            if args.apply {
                apply(&args.target, plan_id, &args.reason).await?;
            }
            Ok(())
        }
        RetentionCommand::Apply(args) => apply(&args.target, args.plan, &args.reason).await,
        RetentionCommand::List(target) => list(&target).await,
    }
}

pub async fn erase(args: EraseArgs) -> anyhow::Result<()> {
    match args.command {
        EraseCommand::Plan(args) => {
            if args.not_authored && !args.mentioning {
                anyhow::bail!("--not-authored leaves nothing to erase without --mentioning");
            }
            let request = PlanDispositionRequest {
                tenant_id: args.target.tenant.clone(),
                erase_subject: args.subject.clone(),
                erase_authored: !args.not_authored,
                erase_mentioning: args.mentioning,
                reason: args.reason.clone(),
                ..PlanDispositionRequest::default()
            };
            plan(&args.target, request).await.map(|_| ())
        }
        EraseCommand::Apply(args) => apply(&args.target, args.plan, &args.reason).await,
    }
}

async fn plan(target: &Target, request: PlanDispositionRequest) -> anyhow::Result<u64> {
    let (mut client, token) = client(target).await?;
    eprintln!(
        "planning for tenant {} (the restorer reads every file of the tenant)…",
        LogSafe(&target.tenant)
    );
    let response = client
        .plan_disposition(authorized(request, &token)?)
        .await
        .map_err(failed("planning"))?
        .into_inner();
    if target.json {
        println!("{}", response.plan_json);
    } else {
        let plan: Plan =
            serde_json::from_str(&response.plan_json).context("the restorer sent a bad plan")?;
        print!("{}", describe_plan(&plan));
    }
    Ok(response.plan_id)
}

async fn apply(target: &Target, plan_id: u64, reason: &str) -> anyhow::Result<()> {
    let (mut client, token) = client(target).await?;
    eprintln!(
        "applying plan {plan_id} of tenant {}…",
        LogSafe(&target.tenant)
    );
    let request = ApplyDispositionRequest {
        tenant_id: target.tenant.clone(),
        plan_id,
        reason: reason.to_string(),
    };
    let response = client
        .apply_disposition(authorized(request, &token)?)
        .await
        .map_err(failed("applying the plan"))?
        .into_inner();
    if target.json {
        println!("{}", response.report_json);
    } else {
        let report: DispositionReport = serde_json::from_str(&response.report_json)
            .context("the restorer sent a bad report")?;
        print!("{}", describe_report(&report));
        println!("signed report committed: {}", response.report_path);
    }
    Ok(())
}

async fn list(target: &Target) -> anyhow::Result<()> {
    let (mut client, token) = client(target).await?;
    let request = ListDispositionsRequest {
        tenant_id: target.tenant.clone(),
    };
    let response = client
        .list_dispositions(authorized(request, &token)?)
        .await
        .map_err(failed("listing dispositions"))?
        .into_inner();
    if target.json {
        for json in response.plan_json.iter().chain(&response.report_json) {
            println!("{json}");
        }
        return Ok(());
    }
    let reports: Vec<DispositionReport> = response
        .report_json
        .iter()
        .map(|json| serde_json::from_str(json))
        .collect::<Result<_, _>>()
        .context("the restorer sent a bad report")?;
    for json in &response.plan_json {
        let plan: Plan = serde_json::from_str(json).context("the restorer sent a bad plan")?;
        let status = match reports.iter().find(|report| report.plan_id == plan.plan_id) {
            Some(report) => format!(
                "applied by {} at {}",
                LogSafe(&report.applied_by),
                chatvault_restorer::render::format_time(report.applied_at_micros)
            ),
            None => "not applied".into(),
        };
        println!(
            "plan {}  {}  by {} at {}: {} row(s) in {} file(s); {status}",
            plan.plan_id,
            LogSafe(&plan.purpose.describe()),
            LogSafe(&plan.planned_by),
            chatvault_restorer::render::format_time(plan.planned_at_micros),
            plan.totals.rows_removed,
            plan.files.len()
        );
    }
    Ok(())
}

fn describe_plan(plan: &Plan) -> String {
    let mut out = format!(
        "plan {} for tenant {}: {} as of {}, decided with {} governance change(s)\n",
        plan.plan_id,
        LogSafe(&plan.tenant_id),
        LogSafe(&plan.purpose.describe()),
        chatvault_restorer::render::format_time(plan.as_of_micros),
        plan.governance_changes
    );
    let totals = &plan.totals;
    out.push_str(&format!(
        "  read {} file(s), {} row(s): {} row(s) to remove; {} file(s) deleted whole, {} rewritten\n",
        totals.files_read,
        totals.rows_read,
        totals.rows_removed,
        totals.files_deleted,
        totals.files_rewritten
    ));
    if totals.rows_held > 0 {
        out.push_str(&format!(
            "  {} row(s) kept by legal holds ({})\n",
            totals.rows_held,
            LogSafe(&plan.holds.join(", "))
        ));
    }
    for conversation in &plan.conversations {
        let policies: Vec<String> = conversation
            .policies
            .iter()
            .map(|count| {
                format!(
                    "{}@{}: {}",
                    count.policy.policy_id, count.policy.version, count.rows
                )
            })
            .collect();
        let mut line = format!(
            "  conversation {}: remove {}",
            LogSafe(&conversation.conversation_id),
            conversation.rows_removed
        );
        if !policies.is_empty() {
            line.push_str(&format!(" ({})", LogSafe(&policies.join(", "))));
        }
        if conversation.rows_held > 0 {
            line.push_str(&format!(
                ", held {} by {}",
                conversation.rows_held,
                LogSafe(&conversation.holds.join(", "))
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    let locked = plan
        .files
        .iter()
        .filter(|file| file.locked_until_micros.is_some())
        .count();
    if locked > 0 {
        out.push_str(&format!(
            "  {locked} file(s) are kept by S3 Object Lock past now: applying takes their rows out of every \
             restore, and S3 keeps their bytes until the dates below.\n  To make them unreadable now, shred \
             the key scope's month (this erases every event of it, not only the planned rows):\n"
        ));
        for offer in &plan.shred_offers {
            out.push_str(&format!(
                "    {}   ({} file(s), locked until {})\n",
                LogSafe(&offer.command),
                offer.files,
                chatvault_restorer::render::format_time(offer.locked_until_micros)
            ));
        }
    }
    out.push_str(&format!(
        "apply it with: chatvault {} apply --tenant {} --plan {}\n",
        match plan.purpose {
            Purpose::Retention => "retention",
            Purpose::Erasure { .. } => "erase",
        },
        LogSafe(&plan.tenant_id),
        plan.plan_id
    ));
    out
}

fn describe_report(report: &DispositionReport) -> String {
    let mut out = format!(
        "plan {} applied by {}: {} row(s) removed, {} file(s) deleted, {} rewritten in {} rewrite commit(s); {} row(s) kept by holds\n",
        report.plan_id,
        LogSafe(&report.applied_by),
        report.rows_removed,
        report.files_deleted,
        report.files_rewritten,
        report.rewrites.len(),
        report.rows_held
    );
    for left in &report.objects_left {
        out.push_str(&format!(
            "  warning: superseded {} could not be deleted: {}\n",
            left.path,
            LogSafe(&left.error)
        ));
    }
    out
}
