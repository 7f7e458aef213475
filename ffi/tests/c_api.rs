//! Builds and runs the C tests and the C example against the library of this very build: the C
//! API test as C11, as C++17 and under AddressSanitizer + UndefinedBehaviorSanitizer (against
//! the shared library), the pthreads tests (admission, and snapshots of a serving engine), the
//! test of engines shared by processes, and the example gateway.
//!
//! Where the libraries are: building the ffi lib for the tests runs rustc once with all its
//! crate types, so `libsluicegate.a` and `libsluicegate.so` are written next to this test
//! binary, in `target/<profile>/deps`. `cargo test` does not copy them up to
//! `target/<profile>` (only `cargo build` does), so copies there may be stale; they are used
//! only when `deps` lacks the libraries, after running `cargo build -p sluicegate-ffi`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[path = "../../redis/tests/common/mod.rs"]
mod redis_server;
use redis_server::RedisServer;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A C test that takes longer than this is hung (they take seconds).
const TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory holding `libsluicegate.a` and `libsluicegate.so` of this build.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let deps = exe.parent().expect("target/<profile>/deps").to_path_buf();
        let has_libs =
            |dir: &Path| dir.join("libsluicegate.a").is_file() && dir.join("libsluicegate.so").is_file();
        if has_libs(&deps) {
            return deps;
        }
        // Not built alongside the tests (another cargo version or layout): build them.
        let profile_dir = deps.parent().expect("target/<profile>").to_path_buf();
        let target_dir = profile_dir.parent().expect("target");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "sluicegate-ffi", "--target-dir"]).arg(target_dir).current_dir(root());
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                build.arg("--release");
            }
            Some(other) => {
                build.args(["--profile", other]);
            }
            None => panic!("unexpected test binary location {}", exe.display()),
        }
        assert!(build.status().expect("run cargo").success(), "cargo build -p sluicegate-ffi failed");
        assert!(has_libs(&profile_dir), "no libsluicegate.a/.so in {}", profile_dir.display());
        profile_dir
    })
}

fn static_lib() -> String {
    lib_dir().join("libsluicegate.a").display().to_string()
}

/// Where a compiled test goes.
fn binary(name: &str) -> String {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name).display().to_string()
}

const STRICT: [&str; 5] = ["-Wall", "-Wextra", "-Werror", "-pedantic", "-Iinclude"];

/// Links a static-library build: the system libraries Rust's std needs.
const STATIC_LIBS: [&str; 3] = ["-lpthread", "-ldl", "-lm"];

fn compile(compiler: &str, args: &[&str]) {
    let output = match Command::new(compiler).args(args).current_dir(root()).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{compiler}` not found: these tests need a C and C++ compiler with sanitizers \
             (e.g. apt-get install gcc g++; .ci/run installs them)"
        ),
        Err(e) => panic!("cannot run {compiler}: {e}"),
    };
    assert!(
        output.status.success(),
        "{compiler} {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a compiled test, optionally with a file as stdin, and returns its stdout once it
/// exited successfully within `TIMEOUT` (killed and failed otherwise).
fn run(binary: &str, stdin: Option<&str>, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(binary);
    // `cargo test` puts `target/<profile>` on LD_LIBRARY_PATH, which wins over the binaries'
    // rpath: without this, the shared-library tests would load a stale `libsluicegate.so` copied
    // there by an earlier `cargo build` instead of this build's.
    cmd.env("LD_LIBRARY_PATH", lib_dir());
    cmd.current_dir(root()).envs(env.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin {
        Some(file) => cmd.stdin(std::fs::File::open(root().join(file)).expect("stdin file")),
        None => cmd.stdin(Stdio::null()),
    };
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            pipe.read_to_end(&mut text).expect("read output");
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{binary} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().expect("stdout"), stderr.join().expect("stderr"));
    assert!(status.success(), "{binary} failed ({status}):\n{stdout}\n{stderr}");
    stdout
}

/// The last line must be "N passed, 0 failed" with N > 0; returns N.
fn assert_all_passed(output: &str) -> usize {
    let last = output.lines().last().unwrap_or_default();
    let passed = last
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no \"N passed, 0 failed\" line at the end of:\n{output}"));
    assert!(passed > 0, "{output}");
    passed
}

#[test]
fn c11_test_calls_every_function_and_gets_every_reachable_result_code() {
    let bin = binary("test_sluicegate_c11");
    let lib = static_lib();
    let mut args = vec!["-std=c11"];
    args.extend(STRICT);
    args.extend(["ffi/tests/c/test_sluicegate.c", &lib]);
    args.extend(STATIC_LIBS);
    args.extend(["-o", &bin]);
    compile("cc", &args);
    // A real redis-server for the many-hosts checks (the other builds check the errors only).
    let redis = RedisServer::start();
    assert_all_passed(&run(&bin, None, &[("SG_REDIS_URL", &redis.url())]));
}

#[test]
fn the_same_c_test_compiles_as_cpp17_and_passes() {
    let bin = binary("test_sluicegate_cpp17");
    let lib = static_lib();
    let mut args = vec!["-x", "c++", "-std=c++17"];
    args.extend(STRICT);
    args.extend(["ffi/tests/c/test_sluicegate.c", "-x", "none", &lib]);
    args.extend(STATIC_LIBS);
    args.extend(["-o", &bin]);
    compile("c++", &args);
    assert_all_passed(&run(&bin, None, &[]));
}

#[test]
fn asan_and_ubsan_find_no_error_and_no_leak_through_the_shared_library() {
    // Every engine the test creates is freed, so no suppression is needed: any leak is ours.
    assert_all_passed(&run_under_sanitizers("test_sluicegate_asan", "ffi/tests/c/test_sluicegate.c"));
}

#[test]
fn four_threads_admit_exactly_the_limit_and_settle_on_other_threads() {
    let bin = binary("threads");
    let lib = static_lib();
    let mut args = vec!["-std=c11", "-pthread"];
    args.extend(STRICT);
    args.extend(["ffi/tests/c/threads.c", &lib]);
    args.extend(STATIC_LIBS);
    args.extend(["-o", &bin]);
    compile("cc", &args);
    let output = run(&bin, None, &[]);
    assert_eq!(assert_all_passed(&output), 8, "{output}");
}

/// Threads sharing one `sg_scope` admit exactly the limit in every window: at three instants,
/// after a restore before each window (every thread finds the handle stale at once), and with
/// the handle's scope reclaimed for new keys between windows. ASan + UBSan, shared library.
#[test]
fn threads_sharing_one_resolved_scope_admit_exactly_the_limit() {
    let output = run_under_sanitizers("scope_threads_asan", "ffi/tests/c/scope_threads.c");
    assert_eq!(assert_all_passed(&output), 14, "{output}");
    assert!(output.contains("phases: 3 of 3 windows admitted exactly the limit; 0 unexpected"), "{output}");
    assert!(
        output.contains("restores: 20 of 20 windows admitted exactly the limit; 0 unexpected"),
        "{output}"
    );
    assert!(
        output.contains("reclaims: 40 of 40 windows admitted exactly the limit; 0 unexpected"),
        "{output}"
    );
}

/// Issue 22: 1,000 snapshots of an engine that 2 threads keep creating (and reclaiming)
/// accounts on, each restored into a second engine; every one must restore. Built with
/// AddressSanitizer + UndefinedBehaviorSanitizer against the shared library (the Rust code is
/// not instrumented, so it runs at about the speed of a plain build: seconds).
#[test]
fn every_snapshot_of_an_engine_creating_accounts_on_two_threads_restores() {
    let output = run_under_sanitizers("live_snapshot_asan", "ffi/tests/c/live_snapshot.c");
    assert_eq!(assert_all_passed(&output), 5, "{output}");
    assert!(output.contains("1000 of 1000 snapshots taken"), "{output}");
    assert!(output.contains(", 1000 restored"), "{output}");
}

/// Compiles `source` (C11, pthreads) with ASan + UBSan against the shared library as `name`,
/// runs it with leak detection on and returns its output.
fn run_under_sanitizers(name: &str, source: &str) -> String {
    let bin = binary(name);
    let dir = lib_dir().display().to_string();
    let (search, rpath) = (format!("-L{dir}"), format!("-Wl,-rpath,{dir}"));
    let mut args = vec![
        "-std=c11",
        "-pthread",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=all",
    ];
    args.extend(STRICT);
    args.extend([source, &search, "-lsluicegate", &rpath, "-o", &bin]);
    compile("cc", &args);
    let env = [("ASAN_OPTIONS", "detect_leaks=1"), ("UBSAN_OPTIONS", "print_stacktrace=1")];
    run(&bin, None, &env)
}

/// Compiles `ffi/tests/c/shared.c` (C11, pthreads, static library) as `name`.
fn compile_shared_test(name: &str) -> String {
    let bin = binary(name);
    let lib = static_lib();
    let mut args = vec!["-std=c11", "-pthread"];
    args.extend(STRICT);
    args.extend(["ffi/tests/c/shared.c", &lib]);
    args.extend(STATIC_LIBS);
    args.extend(["-o", &bin]);
    compile("cc", &args);
    bin
}

/// Issue 14: 4 processes x 2 threads admit exactly 600 of 4,000 requests at 600 a minute, on a
/// shared file and on memory mapped before fork(); a process killed with 100 permits holds its
/// places and the model's load until the permit TTL and not after, and leaves no lock behind;
/// openers that disagree, damaged headers and foreign files get typed errors and change nothing;
/// the file is created 0600. Under a second.
#[test]
fn processes_share_one_engine_exactly_and_a_killed_one_holds_nothing_past_the_ttl() {
    let bin = compile_shared_test("shared");
    let output = run(&bin, None, &[]);
    assert_eq!(assert_all_passed(&output), 1665, "{output}");
    let exact = "600 admitted of 4000, 3400 refused (429 on requests), 0 other, 600 settled";
    assert!(output.contains("file: 4 processes x 2 threads x 500 sg_admit"), "{output}");
    assert!(output.contains("region: 4 processes x 2 threads x 500 sg_admit"), "{output}");
    assert_eq!(output.matches(exact).count(), 2, "{output}");
    assert!(output.contains("past the TTL, 100 of 100 places back"), "{output}");
    assert!(
        output.contains("64 SG_ERR_NOT_A_REGION (magic), 640 SG_ERR_REGION_CORRUPT, 0 other"),
        "{output}"
    );
    assert!(output.contains("the file unchanged by 704 of the failed opens"), "{output}");
    assert!(output.contains("mode: created 600 under umask 000"), "{output}");
}

/// Issue 14: four processes that create one shared file at once must all open it, 50 times
/// over. It found a deadlock: an opener that found the file not ready waited for the exclusive
/// lock, which the first initialiser's lifelong shared lock kept from it (`SharedFile::open` now
/// tries the exclusive lock and otherwise waits on the shared one).
#[test]
fn four_processes_creating_one_shared_file_at_once_all_open_it() {
    let bin = compile_shared_test("shared_creation");
    let output = run(&bin, None, &[("SLUICEGATE_TEST_CREATE_RACE", "1")]);
    assert_all_passed(&output);
    assert!(output.contains("50 of 50 rounds"), "{output}");
}

#[test]
fn the_c_gateway_example_answers_200_over_limit_and_429() {
    let bin = binary("gateway");
    let lib = static_lib();
    let mut args = vec!["-std=c11"];
    args.extend(STRICT);
    args.extend(["examples/c/gateway.c", &lib]);
    args.extend(STATIC_LIBS);
    args.extend(["-o", &bin]);
    compile("cc", &args);
    let output = run(&bin, Some("examples/c/requests.txt"), &[]);
    assert!(output.contains("HTTP/1.1 200"), "{output}");
    assert!(output.contains("x-ratelimit-over-limit: yes"), "{output}");
    assert!(output.contains("HTTP/1.1 429"), "{output}");
    // The story requests.txt tells in its comments: 72 requests; bob's burst runs 3 over the
    // limit, carol's long prompts 2 over the limit and then one 429 on prompt tokens.
    let count = |s: &str| output.matches(s).count();
    assert_eq!(count("HTTP/1.1 200 OK\r\n"), 71, "{output}");
    assert_eq!(count("HTTP/1.1 429 Too Many Requests\r\n"), 1, "{output}");
    assert_eq!(count("x-ratelimit-over-limit: yes\r\n"), 3 + 2 + 1, "{output}");
    assert_eq!(count("\"type\":\"dynamic_token_limited\""), 1, "{output}");
}

/// Guards the claim of the C test: every function the header declares is called in it.
#[test]
fn the_c_test_calls_every_function_the_header_declares() {
    let header = std::fs::read_to_string(root().join("include/sluicegate.h")).expect("header");
    let test = std::fs::read_to_string(root().join("ffi/tests/c/test_sluicegate.c")).expect("C test");
    let declared: Vec<&str> = header
        .lines()
        .filter(|l| !l.starts_with([' ', '*', '/', '#']) && l.ends_with(");"))
        .filter_map(|l| l.split('(').next()?.rsplit([' ', '*']).next())
        .filter(|name| name.starts_with("sg_"))
        .collect();
    assert!(declared.len() >= 30, "found only {declared:?} in the header");
    let missing: Vec<&&str> = declared.iter().filter(|name| !test.contains(&format!("{name}("))).collect();
    assert!(missing.is_empty(), "not called by test_sluicegate.c: {missing:?}");
}
