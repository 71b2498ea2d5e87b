//! The `cowlab` command line: argument parsing only.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cowlab::bench::{self, BenchOptions};
use cowlab::cli::{self, RunOptions, SoakOptions};
use cowlab::control::printable;
use cowlab::kvm::exit_code;
use cowlab::litmus::explore::Strategy;

/// A KVM micro-VM whose VMM is the memory manager of its guests.
#[derive(Parser, Debug)]
// Without a subcommand, a one-line error naming them (`parse_error`),
// not the whole help on stderr.
#[command(name = "cowlab", version, about, long_about = None, arg_required_else_help = false)]
struct Cli {
    /// The KVM device to use.
    #[arg(long, global = true, env = "COWLAB_KVM", default_value = "/dev/kvm")]
    kvm: String,
    /// A new KVM VM for every run, instead of resetting and reusing the
    /// last run's (docs/performance.md, "VM reuse").
    #[arg(long, global = true)]
    fresh_vms: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a litmus test (a built-in name or a .litmus file), or boot a VM
    /// running a built-in guest program on every vCPU.
    Run {
        /// The test or program (see `cowlab list tests`, `cowlab list programs`).
        #[arg(value_name = "TEST|PROGRAM")]
        program: String,
        /// Litmus: how many times to run the test, at least 1 (default: the
        /// test's own `runs` line, else 100).
        #[arg(long)]
        runs: Option<u64>,
        /// Litmus: print one JSON object instead of the litmus7-style text.
        #[arg(long)]
        json: bool,
        /// An injection rule ACTION@POINT[/vN][/hit=N][/addr=A-B][/run=N], ACTION
        /// one of delay=US, pause, count, fail, panic (repeatable; `cowlab list points`).
        #[arg(long, value_name = "RULE")]
        inject: Vec<String>,
        /// Force an interleaving: vN@POINT < vM@POINT < ...
        #[arg(long, value_name = "STEPS")]
        schedule: Option<String>,
        /// Seeded random delays at points (run i of a litmus test uses SEED+i).
        #[arg(long, value_name = "SEED")]
        chaos: Option<u64>,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// The program's argument (e.g. pages to touch); 0 = its default.
        #[arg(long, default_value_t = 0)]
        arg: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// Watchdog: stop a run after SECS seconds (a program: exit 3, naming
        /// stuck vCPUs; a litmus run: its stuck threads are an outcome);
        /// 0.001 to 1000000, or 0 for none.
        #[arg(
            long,
            value_name = "SECS",
            default_value = "30",
            allow_negative_numbers = true
        )]
        timeout: String,
        /// Boot this guest ELF instead of the built-in one (built like guest/).
        #[arg(long, value_name = "ELF")]
        guest: Option<PathBuf>,
        /// Print per-vCPU fault, fill and exit counts on stderr.
        #[arg(long)]
        stats: bool,
        /// Check the memory manager's invariants (mm_verify) as vCPUs and the run end.
        #[arg(long)]
        check: bool,
        /// Kernel behaviour preset (see `cowlab list policies`).
        #[arg(long, value_name = "NAME", default_value = "mainline")]
        policy: String,
        /// Override a knob of the preset, e.g. --set cow_reuse=mapcount (repeatable).
        #[arg(long = "set", value_name = "KNOB=VALUE")]
        set: Vec<String>,
        /// Serve the control socket at PATH while running (docs/control.md).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Start stopped until a `cont` arrives on the control socket.
        #[arg(long)]
        wait: bool,
        /// Record a trace of every run in FILE (docs/trace-format.md).
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Litmus: keep only the runs that satisfied `exists` in the trace.
        #[arg(long, requires = "trace")]
        trace_witnesses_only: bool,
        /// Litmus: run the test as real threads and processes on the host
        /// kernel instead of the model (docs/native.md).
        #[arg(long)]
        native: bool,
    },
    /// One native run of the test on stdin (started by --native; docs/native.md).
    #[command(name = "__native-run", hide = true)]
    NativeRun,
    /// Run a test or suite under the `mainline` model and natively on the
    /// host kernel, side by side; exit 1 if a verdict disagrees
    /// (docs/native.md).
    Diff {
        /// A test (built-in name or .litmus file) or a suite ("all", or see
        /// `cowlab list tests`).
        #[arg(value_name = "TEST|SUITE")]
        what: String,
        /// Runs on each side, at least 1 (default: the test's own `runs`
        /// line, else 10).
        #[arg(long)]
        runs: Option<u64>,
        /// Watchdog per run in seconds (0.001 to 1000000, or 0 for none).
        #[arg(
            long,
            value_name = "SECS",
            default_value = "30",
            allow_negative_numbers = true
        )]
        timeout: String,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The native-Linux baseline of `cowlab bench` (tools/), in this
    /// fresh process: prints one JSON object.
    #[command(hide = true)]
    NativeBaseline { mib: usize },
    /// Read a trace file: print it, or export it for ui.perfetto.dev.
    #[command(arg_required_else_help = false)]
    Trace {
        #[command(subcommand)]
        what: TraceWhat,
    },
    /// Send one command to a control socket and print its answer (or, for
    /// `watch`, print events until the run ends).
    Ctl {
        /// The socket of a `cowlab run --control PATH`.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// query-status, stop, cont, inject, uninject, query-rules,
        /// set-knob, query-points, query-commands, quit, or watch.
        command: String,
        /// Arguments as KEY=VALUE (VALUE read as JSON if it parses, else a string).
        args: Vec<String>,
    },
    /// Run a suite of built-in litmus tests under the policies their
    /// `expect` lines name; print test x policy -> observation.
    Suite {
        /// The suite ("all", or see `cowlab list tests`).
        name: String,
        /// Runs of each test under each policy, at least 1 (default: the
        /// test's own `runs` line, else 10).
        #[arg(long)]
        runs: Option<u64>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Run each test once on the host kernel instead of under each
        /// policy in the model (docs/native.md).
        #[arg(long)]
        native: bool,
        /// With --native: watchdog per run in seconds (0 for none).
        #[arg(
            long,
            value_name = "SECS",
            default_value = "30",
            allow_negative_numbers = true
        )]
        timeout: String,
    },
    /// Soak every built-in `*-free` litmus test (or the --test ones) under
    /// each preset its `expect` lines say `Never` for, with chaos: a row
    /// per (test, preset) of false witnesses, mm_verify violations, errors
    /// and stuck runs; exit 0 only if all are 0 (1 a false witness, 3 the rest).
    Soak {
        /// Runs per (test, preset) and seed, at least 1.
        #[arg(long, default_value_t = 200)]
        runs: u64,
        /// Chaos seed of the first run of each cell (run i uses SEED+i).
        #[arg(long, value_name = "SEED", conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Batches of --runs runs per cell, each from a seed drawn from the
        /// clock (printed); 1 to 1000000.
        #[arg(long, value_name = "K", default_value_t = 1)]
        seeds: u64,
        /// Only this test (repeatable): a built-in name or a .litmus file.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// A time budget in seconds (0.001 to 1000000), shared among the
        /// cells: runs left when it is spent are not made.
        #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
        time: Option<String>,
        /// Watchdog per run in seconds, 0.001 to 1000000 (a run it ends
        /// counts as stuck).
        #[arg(
            long,
            value_name = "SECS",
            default_value = "30",
            allow_negative_numbers = true
        )]
        timeout: String,
        /// An injection rule added to every test's own (repeatable).
        #[arg(long, value_name = "RULE")]
        inject: Vec<String>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Search a litmus test's interleavings for a witness of its `exists`
    /// clause, without a schedule (docs/exploration.md); `explore merge`
    /// combines the --json results of shards.
    #[command(args_conflicts_with_subcommands = true)]
    Explore {
        #[command(subcommand)]
        merge: Option<ExploreWhat>,
        /// The test (a built-in name or a .litmus file).
        #[arg(value_name = "TEST", required = true)]
        test: Option<String>,
        /// Kernel behaviour preset (see `cowlab list policies`).
        #[arg(long, value_name = "NAME", default_value = "mainline")]
        policy: String,
        /// Override a knob of the preset (repeatable).
        #[arg(long = "set", value_name = "KNOB=VALUE")]
        set: Vec<String>,
        /// dfs: every interleaving with at most --bound preemptions; pct:
        /// random priorities with --depth - 1 change points per run.
        #[arg(long, value_parser = ["dfs", "pct"], default_value = "pct")]
        strategy: String,
        /// dfs: the most preemptions per interleaving.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
        bound: u32,
        /// pct: the bug depth searched for (change points + 1).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
        depth: u32,
        /// Runs in all, over every shard (default: pct 1000, dfs until the
        /// space is exhausted).
        #[arg(long, value_name = "RUNS", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        budget: Option<u64>,
        /// Start no run after SECS seconds (0.001 to 1000000).
        #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
        time: Option<String>,
        /// pct: the seed of run 0 (run r's priorities come from SEED and r).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        seed: u64,
        /// Only this part of the search: I/N, 0 <= I < N (merge the parts'
        /// --json results with `cowlab explore merge`).
        #[arg(
            long,
            value_name = "I/N",
            default_value = "0/1",
            allow_hyphen_values = true
        )]
        shard: String,
        /// Watchdog per run in seconds, 0.001 to 1000000 (a run it ends
        /// counts as stuck).
        #[arg(
            long,
            value_name = "SECS",
            default_value = "10",
            allow_negative_numbers = true
        )]
        timeout: String,
        /// Go on after the first witness, counting them.
        #[arg(long)]
        keep_going: bool,
        /// Print the witness's interleaving without minimizing it.
        #[arg(long)]
        no_minimize: bool,
        /// One JSON object (mergeable) instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// List built-in things.
    #[command(arg_required_else_help = false)]
    List {
        #[command(subcommand)]
        what: ListWhat,
    },
    /// Measure the host's limits: VM start, exit, #PF forward, kick, IPI.
    Bench {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Rounds per measurement (a fresh VM each).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
        rounds: u16,
        /// Operations per round.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        iters: u64,
        /// MiB of touched memory for fork / COW / first touch against
        /// native Linux (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [16u64, 64, 256],
              value_parser = clap::value_parser!(u64).range(1..=bench::MAX_SIZE_MIB))]
        sizes: Vec<u64>,
        /// Rounds of the native comparison and of the litmus timings.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=1000))]
        native_rounds: u16,
        /// Runs per round of each litmus test timed.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        litmus_runs: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ExploreWhat {
    /// Combine the --json results of the shards of one search.
    Merge {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// One JSON object instead of the report.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ListWhat {
    /// The built-in guest programs.
    Programs,
    /// The policy presets and their knobs, with the kernel commits.
    Policies,
    /// The built-in litmus tests.
    Tests,
    /// The injection points.
    Points,
}

/// The longest watchdog or time budget, in seconds (about 11.6 days): no
/// run is meant to last that long, and deadlines computed from it cannot
/// overflow the clock.
const MAX_SECS: f64 = 1e6;
/// The shortest one: a millisecond.
const MIN_SECS: f64 = 1e-3;

/// Parses `FLAG SECS`: a number of seconds from [`MIN_SECS`] to
/// [`MAX_SECS`]; or, if `zero` says what it means, 0 (`None`).
fn seconds(flag: &str, text: &str, zero: Option<&str>) -> Result<Option<Duration>, String> {
    let secs = text.trim().parse::<f64>().ok().filter(|s| s.is_finite());
    match secs {
        Some(s) if s == 0.0 && zero.is_some() => Ok(None),
        Some(s) if (MIN_SECS..=MAX_SECS).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(format!(
            "{flag} takes {}{MIN_SECS} to {MAX_SECS} seconds, not '{}'",
            zero.map(|z| format!("0 ({z}) or ")).unwrap_or_default(),
            text.escape_debug()
        )),
    }
}

/// `--runs N` must be at least 1, as a file's `runs` line must.
fn check_runs(n: Option<u64>) {
    if n == Some(0) {
        usage("--runs needs at least 1");
    }
}

/// Runs of `cowlab explore --strategy pct` without `--budget`.
const DEFAULT_PCT_BUDGET: u64 = 1000;

/// The most batches `cowlab soak --seeds K` makes.
const MAX_SEEDS: u64 = 1_000_000;

/// Prints a usage error and exits 2.
fn usage(msg: impl std::fmt::Display) -> ! {
    cli::error(msg);
    std::process::exit(exit_code::USAGE);
}

#[derive(Subcommand, Debug)]
enum TraceWhat {
    /// One line per event: time (µs), track, kind, fields.
    Show {
        file: PathBuf,
        /// Only this vCPU's events (run boundaries are always shown).
        #[arg(long)]
        vcpu: Option<u16>,
        /// Only events of these kinds (repeatable; e.g. Fault, Pte, Copy).
        #[arg(long)]
        kind: Vec<String>,
    },
    /// Convert for a viewer: `--format chrome` is Chrome Trace Event JSON.
    Export {
        file: PathBuf,
        #[arg(long, default_value = "chrome")]
        format: String,
        /// Where to write it.
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        out: PathBuf,
    },
}

/// clap's errors in cowlab's form. Help and version (`--help`, `help
/// run`, `--version`) are output like any other (stdout; exit 0, or 3 if
/// it cannot be written); anything else is one `cowlab: …` line and exit 2.
/// clap's own are several lines (the error, a tip, the usage, a hint) and
/// quote the arguments as given, control characters and all.
fn parse_error(mut e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        cli::out(e.render());
        std::process::exit(cli::finish(exit_code::OK));
    }
    // The arguments quoted in the message, escaped before it is made; the
    // subcommands listed, without the hidden one.
    let hidden: Vec<String> = <Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .filter(|c| c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect();
    let quoted: Vec<_> = e
        .context()
        .filter_map(|(kind, value)| {
            let escaped = match value {
                ContextValue::String(s) => ContextValue::String(printable(s).into_owned()),
                ContextValue::Strings(v) => ContextValue::Strings(
                    v.iter()
                        .filter(|s| kind != ContextKind::ValidSubcommand || !hidden.contains(s))
                        .map(|s| printable(s).into_owned())
                        .collect(),
                ),
                _ => return None,
            };
            Some((kind, escaped))
        })
        .collect();
    for (kind, value) in quoted {
        e.insert(kind, value);
    }
    usage(one_line(&e.render().to_string()))
}

/// A clap error's text as one line: the message with the list under it
/// (`the following required arguments were not provided: <TEST|PROGRAM>`),
/// then its tips and usage in brackets; clap's "For more information" is
/// left out. Control characters left (there should be none) are escaped.
fn one_line(text: &str) -> String {
    let text = text.trim_end();
    let text = text.strip_prefix("error: ").unwrap_or(text);
    let mut blocks = text.split("\n\n").map(str::trim).filter(|b| !b.is_empty());
    let joined = |b: &str| b.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    let mut msg = blocks.next().unwrap_or("invalid arguments").lines();
    let mut line = msg.next().unwrap_or_default().trim().to_string();
    let list: Vec<&str> = msg.map(str::trim).filter(|l| !l.is_empty()).collect();
    if !list.is_empty() {
        line = format!("{line} {}", list.join(", "));
    }
    let notes: Vec<String> = blocks
        .filter(|b| !b.starts_with("For more information"))
        .map(|b| match b.strip_prefix("Usage: ") {
            Some(u) => format!("usage: {}", joined(u)),
            None => joined(b.strip_prefix("tip: ").unwrap_or(b)).replace(" tip: ", "; "),
        })
        .collect();
    if !notes.is_empty() {
        line = format!("{line} ({})", notes.join("; "));
    }
    printable(&line).into_owned()
}

fn main() {
    env_logger::init();
    let cli = Cli::try_parse().unwrap_or_else(|e| parse_error(e));
    cli::fresh_vms(cli.fresh_vms);
    let code = match cli.command {
        Command::Run {
            program,
            runs,
            json,
            inject,
            schedule,
            chaos,
            vcpus,
            arg,
            mem_mib,
            timeout: secs,
            guest,
            stats,
            check,
            policy,
            set,
            control,
            wait,
            trace,
            trace_witnesses_only,
            native,
        } => {
            let timeout =
                seconds("--timeout", &secs, Some("no watchdog")).unwrap_or_else(|e| usage(e));
            check_runs(runs);
            cli::run(&RunOptions {
                program,
                vcpus,
                arg,
                mem_mib,
                timeout,
                guest,
                kvm_path: cli.kvm,
                stats,
                check,
                policy,
                set,
                runs,
                json,
                inject,
                schedule,
                chaos,
                control,
                wait,
                trace,
                trace_witnesses_only,
                native,
            })
        }
        Command::NativeRun => cowlab::native::run_process(),
        Command::Diff {
            what,
            runs,
            timeout: secs,
            json,
        } => {
            let timeout =
                seconds("--timeout", &secs, Some("no watchdog")).unwrap_or_else(|e| usage(e));
            check_runs(runs);
            cli::diff(&what, runs, timeout, json, &cli.kvm)
        }
        Command::NativeBaseline { mib } => {
            if mib > cowlab_tools::MAX_MIB {
                usage(format_args!(
                    "native-baseline takes 1 to {} MiB, not {mib}",
                    cowlab_tools::MAX_MIB
                ));
            }
            cli::native_baseline(mib)
        }
        Command::Trace {
            what: TraceWhat::Show { file, vcpu, kind },
        } => cli::trace_show(&file, vcpu, &kind),
        Command::Trace {
            what: TraceWhat::Export { file, format, out },
        } => cli::trace_export(&file, &format, &out),
        Command::Ctl {
            socket,
            command,
            args,
        } => cowlab::control::client::ctl(&socket, &command, &args),
        Command::List {
            what: ListWhat::Programs,
        } => cli::list_programs(),
        Command::List {
            what: ListWhat::Policies,
        } => cli::list_policies(),
        Command::List {
            what: ListWhat::Tests,
        } => cli::list_tests(),
        Command::List {
            what: ListWhat::Points,
        } => cli::list_points(),
        Command::Suite {
            name,
            runs,
            json,
            native,
            timeout: secs,
        } => {
            check_runs(runs);
            if native {
                let timeout =
                    seconds("--timeout", &secs, Some("no watchdog")).unwrap_or_else(|e| usage(e));
                cli::native::suite(&name, runs, timeout, json)
            } else {
                cli::suite(&name, runs, json, &cli.kvm)
            }
        }
        Command::Soak {
            runs,
            seed,
            seeds,
            tests,
            time,
            timeout: secs,
            inject,
            json,
        } => {
            // Without a meaning for 0, `seconds` never returns `None`.
            let positive = |flag: &str, text: &str| {
                seconds(flag, text, None)
                    .unwrap_or_else(|e| usage(e))
                    .unwrap_or(Duration::from_secs_f64(MAX_SECS))
            };
            check_runs(Some(runs));
            if !(1..=MAX_SEEDS).contains(&seeds) {
                usage(format_args!(
                    "--seeds takes 1 to {MAX_SEEDS} batches, not {seeds}"
                ));
            }
            cli::soak(&SoakOptions {
                tests,
                runs,
                seed,
                seeds,
                time: time.map(|t| positive("--time", &t)),
                timeout: positive("--timeout", &secs),
                inject,
                json,
                kvm_path: cli.kvm,
            })
        }
        Command::Explore {
            merge: Some(ExploreWhat::Merge { files, json }),
            ..
        } => cli::explore_merge(&files, json),
        Command::Explore {
            merge: None,
            test,
            policy,
            set,
            strategy,
            bound,
            depth,
            budget,
            time,
            seed,
            shard,
            timeout,
            keep_going,
            no_minimize,
            json,
        } => {
            let strategy = match strategy.as_str() {
                "dfs" => Strategy::Dfs { bound },
                _ => Strategy::Pct { depth },
            };
            let budget = budget.or(match strategy {
                Strategy::Pct { .. } => Some(DEFAULT_PCT_BUDGET),
                Strategy::Dfs { .. } => None,
            });
            cli::explore(&cli::ExploreArgs {
                test: test.unwrap_or_default(),
                policy,
                set,
                strategy,
                budget,
                time: time.map(|t| {
                    seconds("--time", &t, None)
                        .unwrap_or_else(|e| usage(e))
                        .unwrap_or(Duration::from_secs_f64(MAX_SECS))
                }),
                seed,
                shard: cli::parse_shard(&shard).unwrap_or_else(|e| usage(e)),
                timeout: seconds("--timeout", &timeout, None)
                    .unwrap_or_else(|e| usage(e))
                    .unwrap_or(Duration::from_secs_f64(MAX_SECS)),
                json,
                keep_going,
                minimize: !no_minimize,
                kvm_path: cli.kvm,
            })
        }
        Command::Bench {
            json,
            rounds,
            iters,
            sizes,
            native_rounds,
            litmus_runs,
        } => cli::bench(
            &BenchOptions {
                rounds: rounds.into(),
                iters,
                kvm_path: cli.kvm,
                sizes_mib: sizes,
                native_rounds: native_rounds.into(),
                litmus_runs,
            },
            json,
        ),
    };
    std::process::exit(cli::finish(code));
}
