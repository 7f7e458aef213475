//! `sluicegate`: replay real traffic through a policy before turning it on, or watch the demo.

mod backend;
mod demo;
mod line_starts;
mod plot;
mod replay;
mod report;
mod time_order;
mod top;
mod trace;

use std::fs::File;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sluicegate_core::response::Dialect;
use sluicegate_core::{Overrides, Policy};

use crate::backend::Backend;

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
    /// Replay under each of these policies instead of --policy and compare them side by side:
    /// comma-separated, each a preset with its own overrides after colons, e.g.
    /// fireworks_2024,together,fixed:requests_per_minute=600 (--set applies to all).
    #[arg(long, value_name = "POLICY[:KEY=VALUE...],...")]
    compare: Option<String>,
    /// Spread requests that name no account over N accounts.
    #[arg(long, default_value_t = 1)]
    accounts: u64,
    /// Skew that spread like real tenants: account k gets a share proportional to 1/(k+1)^S
    /// (0: uniform; around 1 is typical).
    #[arg(long, value_name = "S")]
    accounts_zipf: Option<f64>,
    /// Fraction of requests sent on the priority tier.
    #[arg(long, default_value_t = 0.0)]
    priority_share: f64,
    /// The model for traces that name none.
    #[arg(long, default_value = "llama-v3p1-70b-instruct")]
    model: String,
    /// Model a backend with N concurrent slots per model variant; its load (requests in flight,
    /// queued included, per slot) feeds the engine, so overload sheds (503) by class.
    #[arg(long, value_name = "N")]
    capacity: Option<u32>,
    /// With --capacity: generated tokens per second per request; a request holds its slot for
    /// generated / rate + prompt / (20 x rate) seconds.
    #[arg(long, default_value_t = 50.0)]
    tokens_per_second: f64,
    /// Write the per-minute table as CSV to this file ("-": stdout, and nothing else there).
    #[arg(long)]
    csv: Option<String>,
    /// Draw, per metric that binds, demand by outcome against the limit into this SVG file.
    #[arg(long)]
    plot: Option<String>,
    /// Show the headers of each minute's last decision in this dialect.
    #[arg(long)]
    headers: Option<String>,
    /// Stop at the first bad row instead of skipping it.
    #[arg(long)]
    strict: bool,
}

/// Why a command stopped early.
enum Stop {
    /// An error to report.
    Failed(String),
    /// The reader of stdout went away (`| head`): stop quietly, as Unix tools do.
    PipeClosed,
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        Stop::Failed(message)
    }
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe { Stop::PipeClosed } else { Stop::Failed(e.to_string()) }
    }
}

/// `spec` is a preset, optionally followed by `:KEY=VALUE` overrides; `sets` apply first.
fn policy_of(spec: &str, sets: &[String]) -> Result<Policy, String> {
    let mut parts = spec.split(':');
    let name = parts.next().unwrap_or_default();
    let preset = Policy::preset(name)
        .ok_or_else(|| format!("unknown policy {name:?}; expected one of {:?}", Policy::PRESETS))?;
    let mut overrides = Overrides::default();
    for assignment in sets.iter().map(String::as_str).chain(parts) {
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
    preset.with(&overrides).map_err(|e| format!("invalid policy {spec:?}: {e}"))
}

/// Creates `path` for writing, or says which path could not be written.
fn create(path: &str) -> Result<File, String> {
    File::create(path).map_err(|e| format!("cannot write {path}: {e}"))
}

fn run_replay(args: &ReplayArgs) -> Result<(), Stop> {
    let specs: Vec<&str> = match &args.compare {
        Some(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect(),
        None => vec![args.policy.as_str()],
    };
    if specs.is_empty() {
        return Err(Stop::Failed("--compare: no policies given".into()));
    }
    let policies = specs.iter().map(|s| policy_of(s, &args.set)).collect::<Result<Vec<_>, _>>()?;
    let dialect = match &args.headers {
        Some(name) => Some(Dialect::from_name(name).ok_or_else(|| format!("unknown dialect {name:?}"))?),
        None => None,
    };
    let backend = match args.capacity {
        Some(slots) => Some(Backend::new(slots, args.tokens_per_second)?),
        None => None,
    };
    if let Some(s) = args.accounts_zipf.filter(|s| !(s.is_finite() && *s >= 0.0)) {
        return Err(Stop::Failed(format!("--accounts-zipf must be a number at least 0, not {s}")));
    }
    if !(0.0..=1.0).contains(&args.priority_share) {
        let share = args.priority_share;
        return Err(Stop::Failed(format!("--priority-share must be a fraction from 0 to 1, not {share}")));
    }
    // Outputs are opened before the replay, so a bad path fails at once.
    let to_stdout = args.csv.as_deref() == Some("-");
    let csv_file = match args.csv.as_deref() {
        Some(path) if !to_stdout => Some(create(path)?),
        _ => None,
    };
    if let Some(path) = &args.plot {
        create(path)?;
    }

    let options = trace::Options {
        accounts: args.accounts.max(1),
        accounts_zipf: args.accounts_zipf,
        priority_share: args.priority_share,
        model: args.model.clone(),
        strict: args.strict,
    };
    let file = File::open(&args.trace).map_err(|e| format!("cannot open {}: {e}", args.trace))?;
    let trace =
        trace::read(io::BufReader::new(file), &options).map_err(|e| format!("{}: {e}", args.trace))?;
    report::skipped(&args.trace, "skipped", &trace.bad);
    // Dated resets (Anthropic's) read in the trace's own time, or today's for undated traces.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let unix_ns = trace.start_unix_ns.unwrap_or(now.as_nanos() as u64);

    let mut runs = Vec::new();
    for (spec, policy) in specs.iter().zip(policies) {
        let bar = ProgressBar::new(trace.requests.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requests").map_err(|e| e.to_string())?,
        );
        let setup =
            replay::Setup { policy, headers: dialect.map(|d| (d, unix_ns)), backend, strict: args.strict };
        let run = replay::replay(&trace, setup, |done| {
            if done % 4_096 == 0 {
                bar.set_position(done);
            }
        })
        .map_err(|bad| format!("{}: line {}: {}", args.trace, bad.line, bad.reason))?;
        bar.finish_and_clear();
        report::skipped(&args.trace, "counted invalid", &run.errors);
        runs.push(report::Run { name: spec.to_string(), policy, replay: run });
    }

    let stdout = io::stdout();
    let mut out = stdout.lock();
    let compare = args.compare.is_some();
    if to_stdout {
        report::write_csv(&mut out, &runs, compare)?;
    } else if let (Some(file), Some(path)) = (csv_file, &args.csv) {
        let mut file = io::BufWriter::new(file);
        let written = report::write_csv(&mut file, &runs, compare).and_then(|()| file.flush());
        written.map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    if !to_stdout {
        if !compare {
            for run in &runs {
                report::print_minutes(&mut out, &trace, run)?;
            }
        }
        report::print_summary(&mut out, &trace, &runs)?;
    }
    if let Some(path) = &args.plot {
        let title = args.trace.rsplit('/').next().unwrap_or(&args.trace);
        let panels: Vec<_> = runs.iter().map(report::minutes).collect();
        plot::draw(&panels, title, path).map_err(|e| format!("cannot write {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn run_top(args: &TopArgs) -> Result<(), Stop> {
    let region = top::Region::open(&args.path)?;
    if !args.once {
        return Ok(top::run(
            &region,
            std::time::Duration::from_millis(args.interval_ms.max(50)),
            args.limit,
        )?);
    }
    let snapshot = region.read(sluicegate_core::clock::now_ns())?;
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", top::to_json(&snapshot, args.limit))?;
    } else {
        writeln!(
            out,
            "{:<24} {:<24} {:<8} {:>9} {:>14}",
            "account", "model", "variant", "in flight", "requests"
        )?;
        for s in snapshot.scopes.iter().take(args.limit) {
            let requests = sluicegate_core::Metric::Requests;
            writeln!(
                out,
                "{:<24} {:<24} {:<8} {:>9} {:>14}",
                String::from_utf8_lossy(s.account()),
                String::from_utf8_lossy(s.model()),
                if s.variant == sluicegate_core::Variant::Fast { "fast" } else { "regular" },
                s.in_flight,
                format!("{}/{}", s.levels.remaining(requests), s.levels.limit(requests)),
            )?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Replay(args) => run_replay(args),
        Command::Demo => demo::run(&mut io::stdout().lock()).map_err(|e| match e.downcast::<io::Error>() {
            Ok(io) => Stop::from(*io),
            Err(other) => Stop::Failed(other.to_string()),
        }),
        Command::Top(args) => run_top(args),
    };
    match result {
        Ok(()) | Err(Stop::PipeClosed) => ExitCode::SUCCESS,
        Err(Stop::Failed(e)) => {
            eprintln!("sluicegate: {e}");
            ExitCode::FAILURE
        }
    }
}
