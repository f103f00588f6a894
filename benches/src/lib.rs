//! Shared pieces of the benchmarks: chat events of realistic size and process CPU time.

use chatvault_proto::v1::{ChatEvent, EventKind, Sender};

/// A ~500-byte chat message (encoded), as the performance anchors assume.
pub fn chat_message(tenant: &str, index: u64, now_micros: i64) -> ChatEvent {
    let filler =
        "The quarterly numbers look fine but the forecast needs another pass before Friday. ";
    ChatEvent {
        tenant_id: tenant.to_string(),
        workspace_id: "W-bench".into(),
        conversation_id: format!("C{:04}", index % 2000),
        message_id: format!("m{index}"),
        thread_id: if index.is_multiple_of(7) {
            format!("m{}", index.saturating_sub(3))
        } else {
            String::new()
        },
        kind: EventKind::MessageCreated as i32,
        sender: Some(Sender {
            id: format!("U{:03}", index % 97),
            display_name: format!("user {}", index % 97),
            is_bot: false,
        }),
        occurred_at_micros: now_micros - 3_600_000_000 + (index as i64 % 3_600_000) * 1_000,
        text: format!("{index}: {}", &filler.repeat(5)[..380]),
        mentions: if index.is_multiple_of(5) {
            vec!["U001".into()]
        } else {
            vec![]
        },
        ..Default::default()
    }
}

/// CPU time (user + system) this process has used, in seconds, from /proc (Linux); `None` elsewhere.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user_ticks: f64 = fields.get(11)?.parse().ok()?;
    let system_ticks: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((user_ticks + system_ticks) / 100.0)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}
