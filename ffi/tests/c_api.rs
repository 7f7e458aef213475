//! Builds and runs the C tests and the C example against the library cargo just built: C11,
//! C++17, AddressSanitizer + UndefinedBehaviorSanitizer, pthreads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// target/<profile>, holding libsluicegate.a and libsluicegate.so. `cargo test` builds the
/// library only as an rlib for the tests, so it is built here once, into the same target dir.
fn lib_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test binary path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
            let target_dir = profile_dir.parent().expect("target");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "sluicegate-ffi", "--target-dir"]).arg(target_dir).current_dir(root());
            if profile_dir.ends_with("release") {
                build.arg("--release");
            }
            assert!(build.status().expect("run cargo").success(), "cargo build -p sluicegate-ffi failed");
            profile_dir.to_path_buf()
        })
        .clone()
}

fn out(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_TARGET_TMPDIR"))
}

fn compile(compiler: &str, args: &[&str]) {
    let status = Command::new(compiler)
        .args(args)
        .current_dir(root())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (CI installs gcc and g++): {e}"));
    assert!(status.success(), "{compiler} {args:?} failed");
}

fn run(binary: &str, stdin: Option<&str>) -> String {
    let mut cmd = Command::new(binary);
    cmd.current_dir(root()).env("ASAN_OPTIONS", "detect_leaks=1");
    if let Some(file) = stdin {
        cmd.stdin(std::fs::File::open(root().join(file)).expect("input"));
    }
    let output = cmd.output().expect("run");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{binary} failed:\n{text}\n{}", String::from_utf8_lossy(&output.stderr));
    text
}

fn static_lib() -> String {
    lib_dir().join("libsluicegate.a").display().to_string()
}

const STRICT: [&str; 5] = ["-Wall", "-Wextra", "-Werror", "-pedantic", "-Iinclude"];

fn assert_all_passed(output: &str) {
    let last = output.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{output}");
}

#[test]
fn c11_tests_cover_every_function_and_error_code() {
    let bin = out("test_c11");
    let mut args = vec!["-std=c11", "-D_GNU_SOURCE"];
    args.extend(STRICT);
    let lib = static_lib();
    args.extend(["ffi/tests/c/test_sluicegate.c", &lib, "-lpthread", "-ldl", "-lm", "-o", &bin]);
    compile("cc", &args);
    assert_all_passed(&run(&bin, None));
}

#[test]
fn the_same_tests_compile_and_pass_as_cpp17() {
    let bin = out("test_cpp17");
    let mut args = vec!["-x", "c++", "-std=c++17", "-D_GNU_SOURCE"];
    args.extend(STRICT);
    let lib = static_lib();
    args.extend([
        "ffi/tests/c/test_sluicegate.c",
        "-x",
        "none",
        &lib,
        "-lpthread",
        "-ldl",
        "-lm",
        "-o",
        &bin,
    ]);
    compile("c++", &args);
    assert_all_passed(&run(&bin, None));
}

#[test]
fn the_tests_run_clean_under_address_and_undefined_behaviour_sanitizers() {
    let bin = out("test_asan");
    let dir = lib_dir().display().to_string();
    let rpath = format!("-Wl,-rpath,{dir}");
    let libpath = format!("-L{dir}");
    let mut args = vec![
        "-std=c11",
        "-D_GNU_SOURCE",
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=all",
    ];
    args.extend(STRICT);
    args.extend(["ffi/tests/c/test_sluicegate.c", &libpath, "-lsluicegate", &rpath, "-o", &bin]);
    compile("cc", &args);
    assert_all_passed(&run(&bin, None));
}

#[test]
fn four_threads_admit_exactly_the_limit_and_settle_across_threads() {
    let bin = out("threads");
    let mut args = vec!["-std=c11", "-pthread"];
    args.extend(STRICT);
    let lib = static_lib();
    args.extend(["ffi/tests/c/threads.c", &lib, "-lpthread", "-ldl", "-lm", "-o", &bin]);
    compile("cc", &args);
    assert_all_passed(&run(&bin, None));
}

#[test]
fn the_c_example_prints_what_the_gateway_would_answer() {
    let bin = out("gateway");
    let mut args = vec!["-std=c11"];
    args.extend(STRICT);
    let lib = static_lib();
    args.extend(["examples/c/gateway.c", &lib, "-lpthread", "-ldl", "-lm", "-o", &bin]);
    compile("cc", &args);
    let output = run(&bin, Some("examples/c/requests.txt"));
    assert!(output.contains("HTTP/1.1 200\nx-ratelimit-limit-requests: 60"), "{output}");
    assert!(output.contains("x-ratelimit-over-limit: yes"));
    assert!(output.contains("HTTP/1.1 429") && output.contains("\"type\":\"dynamic_token_limited\""));
}
