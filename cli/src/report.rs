//! What a replay prints: the limits in force, the minute table, the CSV and the summary.

use std::io::{self, Write};

use sluicegate_core::{Adaptation, Metric, Policy};

use crate::replay::{BINDINGS, Fate, Minute, Replay};
use crate::trace::{BadRow, Trace};

/// One policy's replay.
pub struct Run {
    /// The policy as named on the command line.
    pub name: String,
    /// The policy, overrides applied.
    pub policy: Policy,
    /// What it did to the trace.
    pub replay: Replay,
}

/// The CSV's columns (`admitted` is in limit; `over_limit` is admitted over a limit).
pub const COLUMNS: [&str; 10] = [
    "minute",
    "demanded",
    "admitted",
    "over_limit",
    "rate_limited",
    "shed",
    "limit_requests",
    "limit_prompt_tokens",
    "limit_uncached_prompt_tokens",
    "limit_generated_tokens",
];

/// Reports rows on stderr, the first 20 by line and the rest as a count.
pub fn skipped(path: &str, what: &str, rows: &[BadRow]) {
    for bad in rows.iter().take(20) {
        eprintln!("{path}: line {}: {what}: {}", bad.line, bad.reason);
    }
    if rows.len() > 20 {
        eprintln!("{path}: {} more rows {what}", rows.len() - 20);
    }
}

/// The limits in force, for the replay's header line: `requests 300/min` for a fixed limit,
/// `requests 60 to 2000/min` for one that adapts, `requests off` for a metric not enforced; then
/// the hard factor and the longest smoothing wait.
pub fn in_force(policy: &Policy) -> String {
    let fixed = matches!(policy.adaptation, Adaptation::Fixed);
    let limits = Metric::ALL.map(|m| {
        let (name, l) = (m.name(), policy.limits.get(m));
        if !l.is_limited() {
            format!("{name} off")
        } else if fixed || l.floor == l.ceiling {
            format!("{name} {}/min", l.floor)
        } else if l.ceiling.is_finite() {
            format!("{name} {} to {}/min", l.floor, l.ceiling)
        } else {
            format!("{name} {}/min and up", l.floor)
        }
    });
    let max_wait = policy.max_wait_ns as f64 / 1e9;
    format!("{}; hard_factor {}, max_wait {max_wait} s", limits.join(", "), policy.hard_factor)
}

fn shown(limit: u64) -> String {
    if limit == u64::MAX { "-".to_string() } else { limit.to_string() }
}

/// A CSV error as the I/O error behind it, so a closed pipe stays one.
fn io_error(e: csv::Error) -> io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

/// The minutes as CSV; with `compare`, each row starts with its policy (column `policy`).
/// Minutes without requests have no row.
pub fn write_csv(out: &mut impl Write, runs: &[Run], compare: bool) -> io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let policy_column = if compare { Some("policy") } else { None };
    w.write_record(policy_column.into_iter().chain(COLUMNS)).map_err(io_error)?;
    for run in runs {
        for m in &run.replay.minutes {
            let counts = [
                m.minute,
                m.demanded(),
                m.count(Fate::Admitted),
                m.count(Fate::OverLimit),
                m.count(Fate::RateLimited),
                m.count(Fate::Shed),
            ];
            let fields = counts.into_iter().map(|v| v.to_string()).chain(m.limits.map(shown));
            let name = if compare { Some(run.name.clone()) } else { None };
            w.write_record(name.into_iter().chain(fields)).map_err(io_error)?;
        }
    }
    w.flush()
}

/// The per-minute table, idle stretches as one line.
pub fn print_minutes(out: &mut impl Write, trace: &Trace, run: &Run) -> io::Result<()> {
    let total: u64 = run.replay.fates().iter().sum();
    writeln!(
        out,
        "{total} requests ({} trace, {} bad rows skipped) under {}: {}",
        trace.format,
        trace.bad.len(),
        run.name,
        in_force(&run.policy)
    )?;
    writeln!(
        out,
        "{:>6} {:>9} {:>9} {:>10} {:>7} {:>6} {:>5} {:>5} {:>10} {:>12} {:>14} {:>15}",
        "minute",
        "demanded",
        "admitted",
        "over_limit",
        "429",
        "503",
        "402",
        "400",
        "limit_rpm",
        "limit_prompt",
        "limit_uncached",
        "limit_generated"
    )?;
    let mut next = None;
    for m in &run.replay.minutes {
        if let Some(next) = next.filter(|&n| n < m.minute) {
            writeln!(out, "{:>6} idle for {} minutes", "...", m.minute - next)?;
        }
        next = Some(m.minute + 1);
        let [r, p, u, g] = m.limits.map(shown);
        let [admitted, over, limited, shed, spend, invalid] = m.fates;
        writeln!(
            out,
            "{:>6} {:>9} {admitted:>9} {over:>10} {limited:>7} {shed:>6} {spend:>5} {invalid:>5} {r:>10} {p:>12} {u:>14} {g:>15}",
            m.minute,
            m.demanded()
        )?;
        for (name, value) in &m.headers {
            writeln!(out, "         {name}: {value}")?;
        }
    }
    writeln!(out)
}

fn share(part: u64, whole: u64) -> String {
    if whole == 0 { "-".into() } else { format!("{:.1}%", part as f64 * 100.0 / whole as f64) }
}

/// Totals side by side, one column per policy: each fate with its share of the requests, the 429s
/// by what bound them, then each policy's most refused accounts.
pub fn print_summary(out: &mut impl Write, trace: &Trace, runs: &[Run]) -> io::Result<()> {
    // Each policy's column as wide as its name, and at least as a count with its share.
    let widths: Vec<usize> = runs.iter().map(|r| r.name.len().max(14)).collect();
    let row = |out: &mut dyn Write, label: &str, cells: &mut dyn Iterator<Item = String>| {
        write!(out, "{label:<34}")?;
        for (cell, width) in cells.zip(&widths) {
            write!(out, "  {cell:>width$}")?;
        }
        writeln!(out)
    };
    let totals: Vec<([u64; 6], [u64; 5], u64)> =
        runs.iter().map(|r| (r.replay.fates(), r.replay.bound(), r.replay.fates().iter().sum())).collect();
    writeln!(out, "Summary ({} trace, {} bad rows skipped)", trace.format, trace.bad.len())?;
    row(out, "policy", &mut runs.iter().map(|r| r.name.clone()))?;
    row(out, "requests", &mut totals.iter().map(|t| t.2.to_string()))?;
    for fate in Fate::ALL {
        let cells = totals.iter().map(|(fates, _, all)| {
            let n = fates[fate as usize];
            format!("{n} {:>6}", share(n, *all))
        });
        row(out, fate.label(), &mut cells.collect::<Vec<_>>().into_iter())?;
        if fate == Fate::RateLimited {
            for (i, binding) in BINDINGS.iter().enumerate() {
                let cells = totals.iter().map(|(fates, bound, _)| {
                    format!("{} {:>6}", bound[i], share(bound[i], fates[Fate::RateLimited as usize]))
                });
                row(out, &format!("  bound by {binding}"), &mut cells.collect::<Vec<_>>().into_iter())?;
            }
        }
    }
    for run in runs {
        let most = run.replay.most_refused(10);
        if most.is_empty() {
            continue;
        }
        let named: Vec<String> = most
            .iter()
            .map(|&(account, n)| format!("{} {n}", trace.accounts.get(account).map_or("?", String::as_str)))
            .collect();
        writeln!(out, "Most refused accounts under {}: {}", run.name, named.join(", "))?;
    }
    Ok(())
}

/// The minutes of a run, for plots.
pub fn minutes(run: &Run) -> (&str, &[Minute]) {
    (run.name.as_str(), run.replay.minutes.as_slice())
}
