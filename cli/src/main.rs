//! `sluicegate`: replay real traffic through a policy before turning it on, or watch the demo.

mod demo;
mod plot;
mod replay;
mod top;
mod trace;

use std::fs::File;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{Adaptation, Capacity, Engine, Metric, Overrides, Policy};

/// Adaptive admission control for LLM gateways: replay traces, watch the demo.
#[derive(Parser)]
#[command(name = "sluicegate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a trace through a policy in simulated time and report minute by minute.
    Replay(ReplayArgs),
    /// The providers' rate-limit stories, told by the engine.
    Demo,
    /// Watch a shared-memory engine (a file under /dev/shm) without writing to it.
    Top(TopArgs),
}

#[derive(clap::Args)]
struct TopArgs {
    /// The shared engine's file, e.g. /dev/shm/sluicegate.
    path: String,
    /// Print one snapshot and exit.
    #[arg(long)]
    once: bool,
    /// With --once: print it as JSON.
    #[arg(long)]
    json: bool,
    /// Busiest scopes shown.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Refresh interval, milliseconds.
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The trace: Azure LLM inference 2023 CSV or sluicegate's own CSV (docs/trace-format.md).
    trace: String,
    /// fireworks_2024, fireworks_2026, together or fixed.
    #[arg(long, default_value = "fireworks_2024")]
    policy: String,
    /// Override a policy parameter, e.g. requests_per_minute=600, hard_factor=1.5, max_wait=2
    /// (seconds), generated_tokens_per_minute=off (repeatable, in any order). Under fixed, only
    /// the limits set are enforced.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Spread requests that name no account over N accounts.
    #[arg(long, default_value_t = 1)]
    accounts: u64,
    /// Fraction of requests sent on the priority tier.
    #[arg(long, default_value_t = 0.0)]
    priority_share: f64,
    /// The model for traces that name none.
    #[arg(long, default_value = "llama-v3p1-70b-instruct")]
    model: String,
    /// Write the per-minute table as CSV to this file ("-": stdout, and nothing else there).
    #[arg(long)]
    csv: Option<String>,
    /// Draw limits and outcomes against time into this SVG file.
    #[arg(long)]
    plot: Option<String>,
    /// Show the headers of each minute's last decision in this dialect.
    #[arg(long)]
    headers: Option<String>,
    /// Stop at the first bad row instead of skipping it.
    #[arg(long)]
    strict: bool,
}

const COLUMNS: [&str; 10] = [
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

fn policy_of(args: &ReplayArgs) -> Result<Policy, String> {
    let preset = Policy::preset(&args.policy)
        .ok_or_else(|| format!("unknown policy {:?}; expected one of {:?}", args.policy, Policy::PRESETS))?;
    let mut overrides = Overrides::default();
    for assignment in &args.set {
        let (key, value) =
            assignment.split_once('=').ok_or_else(|| format!("--set {assignment:?}: expected KEY=VALUE"))?;
        let value: f64 = match value {
            "off" | "none" => f64::INFINITY,
            v => v.parse().map_err(|_| format!("--set {key}: {value:?} is not a number"))?,
        };
        overrides.set(key, value).map_err(|_| {
            format!("--set {key}: unknown parameter; expected one of {:?}", Policy::OVERRIDES)
        })?;
    }
    preset.with(&overrides).map_err(|e| format!("invalid policy: {e}"))
}

/// The limits in force, for the replay's header line: `requests 300/min` for a fixed limit,
/// `requests 60 to 2000/min` for one that adapts, `requests off` for a metric not enforced; then
/// the hard factor and the longest smoothing wait.
fn in_force(policy: &Policy) -> String {
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

fn run_replay(args: &ReplayArgs) -> Result<(), String> {
    let policy = policy_of(args)?;
    let mut render = match &args.headers {
        Some(name) => {
            Some(Render::new(Dialect::from_name(name).ok_or_else(|| format!("unknown dialect {name:?}"))?))
        }
        None => None,
    };
    let options = trace::Options {
        accounts: args.accounts.max(1),
        priority_share: args.priority_share,
        model: args.model.clone(),
        strict: args.strict,
    };
    let file = File::open(&args.trace).map_err(|e| format!("cannot open {}: {e}", args.trace))?;
    let trace =
        trace::read(io::BufReader::new(file), &options).map_err(|e| format!("{}: {e}", args.trace))?;
    for bad in trace.bad.iter().take(20) {
        eprintln!("{}: line {}: skipped: {}", args.trace, bad.line, bad.reason);
    }
    if trace.bad.len() > 20 {
        eprintln!("{}: {} more bad rows skipped", args.trace, trace.bad.len() - 20);
    }
    // Dated resets (Anthropic's) read in the trace's own time, or today's for undated traces.
    if let Some(render) = &mut render {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        render.unix_ns = trace.start_unix_ns.unwrap_or(now.as_nanos() as u64);
        render.monotonic_at = 0;
    }
    let scopes = (trace.requests.len() as u64).min(args.accounts.saturating_mul(8)).max(64) as usize;
    let engine = Engine::new(policy, Capacity::scopes(scopes * 2)).map_err(|e| e.to_string())?;
    let bar = ProgressBar::new(trace.requests.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} requests").map_err(|e| e.to_string())?);
    let minutes = replay::replay(&engine, &trace.requests, render, |done| {
        if done % 4_096 == 0 {
            bar.set_position(done);
        }
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();

    let to_stdout = args.csv.as_deref() == Some("-");
    if let Some(path) = &args.csv {
        let out: Box<dyn Write> = if to_stdout {
            Box::new(io::stdout())
        } else {
            Box::new(File::create(path).map_err(|e| e.to_string())?)
        };
        let mut w = csv::Writer::from_writer(out);
        w.write_record(COLUMNS).map_err(|e| e.to_string())?;
        for m in &minutes {
            let [r, p, u, g] = m.limits.map(shown);
            let row = [m.minute, m.demanded, m.admitted, m.over_limit, m.rate_limited, m.shed]
                .map(|v| v.to_string());
            w.write_record(row.iter().map(String::as_str).chain([
                r.as_str(),
                p.as_str(),
                u.as_str(),
                g.as_str(),
            ]))
            .map_err(|e| e.to_string())?;
        }
        w.flush().map_err(|e| e.to_string())?;
    }
    if !to_stdout {
        print_table(&trace, &minutes, &args.policy, &policy);
    }
    if let Some(path) = &args.plot {
        let title = format!("{} under {}", args.trace.rsplit('/').next().unwrap_or(&args.trace), args.policy);
        plot::draw(&minutes, &title, path).map_err(|e| format!("plot: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn print_table(trace: &trace::Trace, minutes: &[replay::Minute], name: &str, policy: &Policy) {
    let total: u64 = minutes.iter().map(|m| m.demanded).sum();
    println!(
        "{} requests ({} trace, {} bad rows skipped) under {name}: {}",
        total,
        trace.format,
        trace.bad.len(),
        in_force(policy)
    );
    println!(
        "{:>6} {:>9} {:>9} {:>10} {:>7} {:>6} {:>7} {:>10} {:>12} {:>14} {:>15}",
        "minute",
        "demanded",
        "admitted",
        "over_limit",
        "429",
        "503",
        "400/402",
        "limit_rpm",
        "limit_prompt",
        "limit_uncached",
        "limit_generated"
    );
    for m in minutes {
        let [r, p, u, g] = m.limits.map(shown);
        println!(
            "{:>6} {:>9} {:>9} {:>10} {:>7} {:>6} {:>7} {r:>10} {p:>12} {u:>14} {g:>15}",
            m.minute, m.demanded, m.admitted, m.over_limit, m.rate_limited, m.shed, m.refused
        );
        for (name, value) in &m.headers {
            println!("         {name}: {value}");
        }
    }
}

fn run_top(args: &TopArgs) -> Result<(), String> {
    let region = top::Region::open(&args.path)?;
    if !args.once {
        return top::run(&region, std::time::Duration::from_millis(args.interval_ms.max(50)), args.limit);
    }
    let snapshot = region.read(sluicegate_core::clock::now_ns())?;
    if args.json {
        println!("{}", top::to_json(&snapshot, args.limit));
    } else {
        println!("{:<24} {:<24} {:<8} {:>9} {:>14}", "account", "model", "variant", "in flight", "requests");
        for s in snapshot.scopes.iter().take(args.limit) {
            let requests = sluicegate_core::Metric::Requests;
            println!(
                "{:<24} {:<24} {:<8} {:>9} {:>14}",
                String::from_utf8_lossy(s.account()),
                String::from_utf8_lossy(s.model()),
                if s.variant == sluicegate_core::Variant::Fast { "fast" } else { "regular" },
                s.in_flight,
                format!("{}/{}", s.levels.remaining(requests), s.levels.limit(requests)),
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Replay(args) => run_replay(args),
        Command::Demo => demo::run().map_err(|e| e.to_string()),
        Command::Top(args) => run_top(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluicegate: {e}");
            ExitCode::FAILURE
        }
    }
}
