//! `cargo xtask <task>`: setup, build, run, test, bench.
//!
//! Everything the project needs beyond the machine image is installed here, idempotently, so a
//! fresh clone on a fresh machine works with `cargo xtask test` alone.
use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::{fs::symlink, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// bpf-linker release line that builds against the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13";
const BPF_LINKER_FEATURE: &str = "llvm-22";
const NIGHTLY: &str = "nightly";

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs beyond the machine image (idempotent).
    Setup(SetupArgs),
    /// Build the eBPF programs and the `lb` binary (release).
    Build(SetupArgs),
    /// Build everything, then run the balancer (root). Without arguments: in the lab (network
    /// namespaces on this machine: a client, the balancer, 3 nodes), until Ctrl-C, which also
    /// removes the lab. With arguments: `lb run ARGS` on a real NIC.
    Run {
        #[command(flatten)]
        setup: SetupArgs,
        /// Arguments for `lb run`, e.g. `--iface eth0 --config lb.toml`; none: the lab.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// The lab, kept running in the background: `up [--balancers N]`, `down`, `status` (root).
    Lab {
        #[command(flatten)]
        setup: SetupArgs,
        #[command(subcommand)]
        action: LabAction,
    },
    /// Setup, fmt check, clippy (all crates), host unit tests, then the root-only suites.
    Test {
        #[command(flatten)]
        setup: SetupArgs,
        /// Only run root-only test binaries whose name contains this (e.g. `fixtures`).
        #[arg(long)]
        only: Option<String>,
    },
    /// Benchmarks that print a table and write JSON under target/bench/ (`dataplane` and
    /// `control` also their SVG chart); `charts [--out DIR]` re-renders the charts from that JSON.
    Bench {
        #[command(flatten)]
        setup: SetupArgs,
        /// `dataplane`, `control` or `lab` (the balancer in the lab: Mpps on a veth in native
        /// mode beside a trivial XDP_TX program, HTTP requests/s through the VIP vs direct), or
        /// `charts` (no benchmark runs, no root needed; `--out DIR` relative to the workspace).
        which: String,
        /// Extra arguments for the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Create the lab and start the balancer, agents and servers in it; prints how to reach
    /// the VIPs and which `lb` commands to try.
    Up {
        /// Nodes behind the balancer.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// `auto` (native XDP where the veths allow it) or `generic`.
        #[arg(long, default_value = "auto")]
        xdp: String,
        /// The cluster lab: N balancers (2..=8) in cluster mode behind a router doing ECMP over
        /// BGP (bird2), with etcd; every node's agent beats to all of them.
        #[arg(long, value_name = "N")]
        balancers: Option<u32>,
        /// Keep the balancer in the foreground until Ctrl-C, then remove the lab (what
        /// `cargo xtask run` without arguments does).
        #[arg(long)]
        foreground: bool,
    },
    /// Remove everything of the lab, also after a crash.
    Down,
    /// Namespaces, processes and the balancer's status.
    Status,
}

#[derive(clap::Args, Clone)]
struct SetupArgs {
    /// Offline copy of the nightly's rust-src component (tar.xz), used when rustup cannot
    /// fetch it. Also read from LB_RUST_SRC_TARBALL.
    #[arg(long, env = "LB_RUST_SRC_TARBALL")]
    rust_src_tarball: Option<PathBuf>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match cli.task {
        Task::Setup(s) => {
            setup(&root, &s)?;
            ensure_test_packages()
        }
        Task::Build(s) => {
            setup(&root, &s)?;
            build(&root)
        }
        Task::Run { setup: s, args } => {
            setup(&root, &s)?;
            require_root("cargo xtask run")?;
            if args.is_empty() {
                build_lab(&root)?;
                return lab_foreground(&root, &["up".into(), "--foreground".into()]);
            }
            build(&root)?;
            let lb = target_dir(&root).join("release/lb");
            let err = Command::new(&lb).arg("run").args(&args).exec();
            Err(err).with_context(|| format!("exec {}", lb.display()))
        }
        Task::Lab { setup: s, action } => {
            setup(&root, &s)?;
            require_root("cargo xtask lab")?;
            build_lab(&root)?;
            let args: Vec<OsString> = match action {
                LabAction::Up {
                    nodes,
                    xdp,
                    balancers,
                    foreground,
                } => {
                    let mut a: Vec<OsString> = vec![
                        "up".into(),
                        "--nodes".into(),
                        nodes.to_string().into(),
                        "--xdp".into(),
                        xdp.into(),
                    ];
                    if let Some(b) = balancers {
                        a.extend(["--balancers".into(), b.to_string().into()]);
                    }
                    if foreground {
                        a.push("--foreground".into());
                        return lab_foreground(&root, &a);
                    }
                    a
                }
                LabAction::Down => vec!["down".into()],
                LabAction::Status => vec!["status".into()],
            };
            let lab = target_dir(&root).join("release/lb-lab");
            let err = Command::new(&lab).args(&args).exec();
            Err(err).with_context(|| format!("exec {}", lab.display()))
        }
        Task::Test { setup: s, only } => test(&root, &s, only.as_deref()),
        Task::Bench {
            setup: s,
            which,
            args,
        } => {
            if !matches!(which.as_str(), "dataplane" | "control" | "lab" | "charts") {
                bail!("unknown benchmark {which:?}: use `dataplane`, `control`, `lab` or `charts`");
            }
            // `lb-bench` links the balancer's objects, so even `charts` needs the eBPF build.
            setup(&root, &s)?;
            if which != "charts" {
                require_root("cargo xtask bench")?;
                ensure_bpffs()?;
            }
            // The control benchmark runs the real daemon and agents; the lab benchmark the lab
            // (`lb-lab`, next to `lb-bench`).
            match which.as_str() {
                "charts" => {}
                "lab" => build_lab(&root)?,
                _ => cargo(&root)
                    .args(["build", "--release", "-p", "lb-userspace", "--bins"])
                    .status_ok("building lb")?,
            }
            cargo(&root)
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "lb-tests",
                    "--bin",
                    "lb-bench",
                    "--",
                ])
                .arg(&which)
                .args(&args)
                .status_ok("benchmark")
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .context("CARGO_MANIFEST_DIR not set: run this through `cargo xtask`")?;
    dir.parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

// ---------------------------------------------------------------------------------------------
// setup
// ---------------------------------------------------------------------------------------------

fn setup(root: &Path, args: &SetupArgs) -> Result<()> {
    ensure_nightly()?;
    ensure_rust_src(root, args)?;
    ensure_bpf_linker(root)?;
    ensure_build_packages()?;
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        say("nightly toolchain: present");
        return Ok(());
    }
    say("nightly toolchain: installing");
    Command::new("rustup")
        .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
        .args(["--component", "rust-src,clippy,rustfmt"])
        .status_ok("rustup toolchain install nightly")
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .output()
        .context("rustc +nightly --print sysroot")?;
    if !out.status.success() {
        bail!(
            "rustc +nightly --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn ensure_rust_src(root: &Path, args: &SetupArgs) -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let marker = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if marker.exists() {
        say("rust-src for nightly: present");
        return Ok(());
    }
    say("rust-src for nightly: installing with rustup");
    let rustup = |verb: &str| {
        Command::new("rustup")
            .args(["component", verb, "rust-src", "--toolchain", NIGHTLY])
            .status()
            .is_ok_and(|s| s.success())
    };
    // A component rustup believes installed but whose files are gone: reinstall it.
    if rustup("add") && !marker.exists() && rustup("remove") {
        rustup("add");
    }
    if marker.exists() {
        return Ok(());
    }
    // Offline fallback: the tarball named by --rust-src-tarball / LB_RUST_SRC_TARBALL, or the
    // copy that ships beside the repository in ../shared/toolchain.
    let tarball = match &args.rust_src_tarball {
        Some(t) => t.clone(),
        None => find_shared_rust_src(root).context(
            "rustup could not install rust-src and no offline copy was given: \
             pass --rust-src-tarball FILE or set LB_RUST_SRC_TARBALL",
        )?,
    };
    say(&format!(
        "rust-src for nightly: extracting {}",
        tarball.display()
    ));
    let dest = sysroot.join("lib/rustlib/src");
    fs::create_dir_all(&dest).with_context(|| format!("mkdir {}", dest.display()))?;
    Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dest)
        .status_ok("extracting rust-src")?;
    if !marker.exists() {
        bail!("{} did not provide {}", tarball.display(), marker.display());
    }
    Ok(())
}

fn find_shared_rust_src(root: &Path) -> Option<PathBuf> {
    let dir = root.join("../shared/toolchain");
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("rust-src-nightly") && n.ends_with(".tar.xz"))
        })
}

fn ensure_bpf_linker(root: &Path) -> Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        say("bpf-linker: present");
        return Ok(());
    }
    // bpf-linker must link against the nightly's own LLVM: expose it under an LLVM prefix.
    let sysroot_lib = nightly_sysroot()?.join("lib");
    let llvm = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;
    let prefix = root.join("target/llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("mkdir {}", lib.display()))?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(sysroot_lib.join(&llvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    say(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against the nightly's LLVM ({llvm}); a few minutes"
    ));
    Command::new("cargo")
        .current_dir(&prefix)
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version"])
        .arg(format!("^{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", BPF_LINKER_FEATURE])
        .status_ok("cargo install bpf-linker")
}

fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    say("bpffs: mounting at /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").context("mkdir /sys/fs/bpf")?;
    Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status_ok("mount -t bpf bpf /sys/fs/bpf (is BPF enabled in this kernel?)")
}

/// Debian packages the build needs: `protoc` for the etcd client's gRPC code (`etcd-client`'s
/// build script runs it) and the well-known types its protos import (`libprotobuf-dev`).
/// An entry's first element is a binary on the PATH, or an absolute path to a file.
const BUILD_PACKAGES: [(&str, &str); 2] = [
    ("protoc", "protobuf-compiler"),
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
];

/// Debian packages the namespace suites use, installed only when missing: `ip` and `nsenter`
/// for the labs, headless `chromium` for the status page test (`cli_e2e`), `etcd` for the
/// cluster store (`cluster_e2e`), `bird` and `birdc` (bird2) for the BGP router and the
/// balancers' announcements in the cluster lab (`ecmp_e2e`).
const TEST_PACKAGES: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("chromium", "chromium"),
    ("etcd", "etcd-server"),
    ("bird", "bird2"),
    ("birdc", "bird2"),
];

fn ensure_build_packages() -> Result<()> {
    ensure_packages(
        "build packages",
        &BUILD_PACKAGES,
        "the build needs them (protoc and the well-known protos: etcd-client's gRPC code)",
    )
}

fn ensure_test_packages() -> Result<()> {
    ensure_packages(
        "test packages",
        &TEST_PACKAGES,
        "the namespace suites need them (chromium: the status page test of cli_e2e; \
         etcd: cluster_e2e; bird2: ecmp_e2e)",
    )
}

/// Installs the Debian packages of `list` (`(binary or absolute file, package)`) whose binary
/// or file is missing; after the install every one must be there.
fn ensure_packages(what: &str, list: &[(&str, &str)], why: &str) -> Result<()> {
    // A package may provide several entries (bird2: `bird` and `birdc`): each named once.
    let missing = || -> Vec<&str> {
        let mut v: Vec<&str> = list
            .iter()
            .filter(|(bin, _)| {
                if bin.starts_with('/') {
                    !Path::new(bin).is_file()
                } else {
                    !on_path(bin)
                }
            })
            .map(|(_, pkg)| *pkg)
            .collect();
        v.dedup();
        v
    };
    let mut names: Vec<&str> = list.iter().map(|(_, pkg)| *pkg).collect();
    names.dedup();
    let names = names.join(", ");
    let wanted = missing();
    if wanted.is_empty() {
        say(&format!("{what} ({names}): present"));
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the {what} {} are missing and installing them needs root: run \
             `cargo xtask setup` as root, or `apt-get install --no-install-recommends {}`",
            wanted.join(" "),
            wanted.join(" ")
        );
    }
    say(&format!("{what}: installing {}", wanted.join(" ")));
    Command::new("apt-get")
        .args(["update", "-qq"])
        .status_ok("apt-get update")?;
    Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&wanted)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status_ok(&format!("apt-get install {}", wanted.join(" ")))?;
    let still = missing();
    if !still.is_empty() {
        bail!(
            "{} still missing after apt-get install: {why}",
            still.join(" ")
        );
    }
    Ok(())
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(bin).is_file()))
        || Path::new("/usr/sbin").join(bin).is_file()
        || Path::new("/sbin").join(bin).is_file()
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF programs, bpffs and network namespaces): run it as root");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// build, test
// ---------------------------------------------------------------------------------------------

fn build(root: &Path) -> Result<()> {
    cargo(root)
        .args(["build", "--release", "-p", "lb-userspace", "--bins"])
        .status_ok("cargo build")
}

/// `lb` and the lab's `lb-lab` (release).
fn build_lab(root: &Path) -> Result<()> {
    cargo(root)
        .args(["build", "--release", "-p", "lb-userspace", "-p", "lb-tests"])
        .args(["--bin", "lb", "--bin", "lb-lab"])
        .status_ok("cargo build (lb, lb-lab)")
}

fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Runs `lb-lab ARGS` (a foreground lab) and waits for it. Ctrl-C reaches it and us: it stops
/// the balancer and removes the lab; we only wait (a handler, not SIG_IGN, so the child gets
/// the default disposition back). Should it die of a signal, the lab is removed here.
fn lab_foreground(root: &Path, args: &[OsString]) -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = note_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let lab = target_dir(root).join("release/lb-lab");
    let mut child = Command::new(&lab)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", lab.display()))?;
    let mut forwarded = false;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for lb-lab")? {
            break st;
        }
        // A SIGTERM or SIGHUP sent to xtask alone: pass it on.
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) && !forwarded {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            forwarded = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if status.success() {
        return Ok(());
    }
    if status.code().is_none() {
        eprintln!("xtask: lb-lab died ({status}): removing the lab");
        Command::new(&lab).arg("down").status_ok("lb-lab down")?;
    }
    bail!("lb-lab failed ({status})")
}

fn test(root: &Path, args: &SetupArgs, only: Option<&str>) -> Result<()> {
    setup(root, args)?;
    require_root("cargo xtask test (the kernel suites)")?;
    ensure_bpffs()?;
    ensure_test_packages()?;

    step("fmt");
    cargo(root)
        .args(["fmt", "--all", "--", "--check"])
        .status_ok("cargo fmt --check (run `cargo fmt --all`)")?;

    step("clippy (userspace crates)");
    cargo(root)
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"])
        .status_ok("cargo clippy")?;
    // lb-ebpf's library (parse/checksum/decision logic) also builds on the host.
    cargo(root)
        .args([
            "clippy", "-p", "lb-ebpf", "--lib", "--tests", "--", "-D", "warnings",
        ])
        .status_ok("cargo clippy (lb-ebpf lib, host)")?;

    step("clippy (eBPF crate, BPF target)");
    Command::new("cargo")
        .current_dir(root.join("lb-ebpf"))
        .arg(format!("+{NIGHTLY}"))
        .args([
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--bins", "--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status_ok("cargo clippy (lb-ebpf)")?;

    step("host unit tests");
    cargo(root)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "lb-tests",
            "--exclude",
            "lb-ebpf",
        ])
        .status_ok("host unit tests")?;
    cargo(root)
        .args(["test", "-p", "lb-ebpf", "--lib"])
        .status_ok("lb-ebpf host unit tests")?;

    step("kernel suites (root: BPF_PROG_TEST_RUN fixtures, namespaces)");
    // The namespace suites run the real `lb` binary (daemon and agents); `lab_e2e` runs the
    // lab's `lb-lab`.
    build_lab(root)?;
    let mut c = cargo(root);
    c.args(["test", "--release", "-p", "lb-tests"]);
    if let Some(only) = only {
        c.args(["--test", only]);
    }
    // The suites share the kernel (namespaces, bpffs): one test at a time.
    c.args(["--", "--test-threads=1"])
        .status_ok("kernel suites")
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

fn say(msg: &str) {
    eprintln!("setup: {msg}");
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}

trait StatusOk {
    fn status_ok(&mut self, what: &str) -> Result<()>;
}

impl StatusOk for Command {
    fn status_ok(&mut self, what: &str) -> Result<()> {
        let status = self
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("{what}: could not start {:?}", self.get_program()))?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(())
    }
}
