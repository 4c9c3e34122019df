//! Real programs from Debian's source packages: fetched with `apt-get
//! source` at test time (never committed), built with their upstream build
//! systems at `-O0 -g -fno-omit-frame-pointer` (vendored code included),
//! instrumented, and cached under `<target>/real/<package>/<version>/` so a
//! second run does not rebuild.
//!
//! `scripts/deps` enables the `deb-src` entries and installs the build
//! dependencies the recipes need.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use upstare_rewriter::rewrite::PointsMode;
use upstare_testkit::target_dir;

/// The flags every real program is built with: the target contract.
pub const REAL_CFLAGS: &str = "-O0 -g -fno-omit-frame-pointer";

/// How one Debian source package is built for upstare.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    /// Source package name (`apt-get source NAME=VERSION`).
    pub package: &'static str,
    /// The binary the build produces, relative to the source tree.
    pub binary: &'static str,
    /// Edits to the unpacked tree before configuring, as `(file, from, to)`
    /// literal replacements: vendored code whose own makefiles hard-code
    /// `-O2` is built at `-O0` too. A replacement that finds nothing is an
    /// error (the recipe no longer fits the source).
    pub edits: &'static [(&'static str, &'static str, &'static str)],
    /// Run `autoreconf` before configuring: Debian's patches change
    /// `configure.ac`, and a configure script that checks its own age
    /// refuses to run older than it (Debian's rules regenerate it too).
    pub autoreconf: bool,
    /// Arguments of `./configure` (none: no configure step).
    pub configure: &'static [&'static str],
    /// Extra `make` arguments.
    pub make: &'static [&'static str],
}

/// A version pair: a package's version and its security update.
#[derive(Clone, Copy, Debug)]
pub struct RealPair {
    pub recipe: Recipe,
    /// The version a user runs.
    pub old: &'static str,
    /// Debian's security update of it.
    pub new: &'static str,
}

/// memcached 1.6.18 and its bookworm security update, configured so that
/// the patched proxy code is compiled in (with Debian's own flags both
/// builds have identical code).
pub const MEMCACHED: RealPair = RealPair {
    recipe: Recipe {
        package: "memcached",
        binary: "memcached",
        edits: &[
            (
                "vendor/mcmc/Makefile",
                "-g -O2",
                "-g -O0 -fno-omit-frame-pointer",
            ),
            (
                "vendor/Makefile",
                "CFLAGS=\"-g\"",
                "CFLAGS=\"-g -O0 -fno-omit-frame-pointer\"",
            ),
        ],
        autoreconf: false,
        configure: &["--enable-sasl", "--enable-sasl-pwdb", "--enable-proxy"],
        make: &[],
    },
    old: "1.6.18-1",
    new: "1.6.18-1+deb12u1",
};

/// redis 7.0.15 and its bookworm security update, built with the libc
/// allocator (the heap is glibc's, as upstare's heap walk expects), its
/// vendored lua and hiredis at -O0 too.
pub const REDIS: RealPair = RealPair {
    recipe: Recipe {
        package: "redis",
        binary: "src/redis-server",
        edits: &[
            (
                "deps/Makefile",
                "LUA_CFLAGS+= -O2 ",
                "LUA_CFLAGS+= -O0 -fno-omit-frame-pointer ",
            ),
            (
                "deps/hdr_histogram/Makefile",
                "OPT= -Os",
                "OPT= -O0 -fno-omit-frame-pointer",
            ),
            (
                "deps/linenoise/Makefile",
                "OPT= -Os",
                "OPT= -O0 -fno-omit-frame-pointer",
            ),
        ],
        autoreconf: false,
        configure: &[],
        make: &[
            "MALLOC=libc",
            "OPTIMIZATION=-O0 -fno-omit-frame-pointer",
            "BUILD_TLS=no",
            "USE_SYSTEMD=no",
        ],
    },
    old: "5:7.0.15-1~deb12u7",
    new: "5:7.0.15-1~deb12u10",
};

/// nginx 1.22.1 and its bookworm security update, with the modules
/// Debian's rules enable in every flavour (http_v2 included); the
/// dynamic modules of the full flavour are left out.
pub const NGINX: RealPair = RealPair {
    recipe: Recipe {
        package: "nginx",
        binary: "objs/nginx",
        edits: &[],
        autoreconf: false,
        configure: &[
            "--with-cc-opt=-O0 -g -fno-omit-frame-pointer",
            "--with-compat",
            "--with-debug",
            "--with-pcre-jit",
            "--with-http_ssl_module",
            "--with-http_stub_status_module",
            "--with-http_realip_module",
            "--with-http_auth_request_module",
            "--with-http_v2_module",
            "--with-http_dav_module",
            "--with-http_slice_module",
            "--with-threads",
        ],
        make: &[],
    },
    old: "1.22.1-9+deb12u9",
    new: "1.22.1-9+deb12u11",
};

/// OpenSSH 9.2p1 and its bookworm security update (its sshd only). As in
/// Debian's build: privilege separation as user `sshd` chrooted to
/// `/run/sshd`, the seccomp sandbox of the pre-authentication child,
/// OpenSSL and zlib, the hardening flags configure adds itself
/// (`-fzero-call-used-regs`, `-ftrivial-auto-var-init`, stack protector),
/// `configure` regenerated by `autoreconf` from Debian's patched
/// `configure.ac`. Unlike Debian's: no PAM, Kerberos/GSSAPI, SELinux,
/// libaudit, systemd notification, TCP wrappers, libedit or built-in FIDO
/// keys (each needs a development library and none is on the path of a
/// public-key login), default `--sysconfdir`/`--prefix` (the tests give
/// sshd its own configuration with `-f`).
pub const OPENSSH: RealPair = RealPair {
    recipe: Recipe {
        package: "openssh",
        binary: "sshd",
        edits: &[],
        autoreconf: true,
        configure: &[
            "--with-privsep-path=/run/sshd",
            "--with-privsep-user=sshd",
            "--disable-strip",
            "--with-4in6",
            "ac_cv_func_mkdtemp=no",
        ],
        make: &["sshd"],
    },
    old: "1:9.2p1-2+deb12u7",
    new: "1:9.2p1-2+deb12u10",
};

/// What went wrong fetching or building a real program.
#[derive(Debug, thiserror::Error)]
pub enum RealBuildError {
    /// A step's command failed; its log is kept.
    #[error("{package} {version}: {step} failed (exit {status}); log: {log}")]
    Step {
        package: &'static str,
        version: String,
        step: &'static str,
        status: String,
        log: PathBuf,
    },
    /// A recipe's edit found nothing to replace.
    #[error("{package} {version}: {file} has no `{from}` to replace (the recipe no longer fits the source)")]
    Edit {
        package: &'static str,
        version: String,
        file: &'static str,
        from: &'static str,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The rewriter refused the build.
    #[error("{package} {version}: upstare-rewrite refused {binary}: {message}")]
    Rewrite {
        package: &'static str,
        version: String,
        binary: PathBuf,
        message: String,
    },
}

/// One cached build of one version.
#[derive(Clone, Debug)]
pub struct RealBuild {
    /// The package's unpacked and built source tree.
    pub tree: PathBuf,
    /// The program as built.
    pub original: PathBuf,
    /// The program instrumented by the rewriter.
    pub instrumented: PathBuf,
    /// Seconds spent building now (0 when the cache was used).
    pub build_secs: f64,
    /// Seconds the rewriter took (0 when the cache was used).
    pub rewrite_secs: f64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RealBuildError + '_ {
    move |source| RealBuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A Debian version without its epoch, as file names carry it.
fn file_version(version: &str) -> &str {
    version.split_once(':').map_or(version, |(_, v)| v)
}

/// The cache directory of one version: `<target>/real/<package>/<version>`.
pub fn cache_dir(recipe: &Recipe, version: &str) -> PathBuf {
    target_dir()
        .join("real")
        .join(recipe.package)
        .join(file_version(version))
}

/// Everything that determines a build: a change rebuilds.
fn stamp(recipe: &Recipe, version: &str) -> String {
    let edits: Vec<String> = recipe
        .edits
        .iter()
        .map(|(file, from, to)| format!("{file}:{from}=>{to}"))
        .collect();
    format!(
        "{} {version}\ncflags {REAL_CFLAGS}\nedits {}\n{}configure {}\nmake {}\n",
        recipe.package,
        edits.join(" | "),
        // Said only when set, so the other recipes' cached builds stay valid.
        if recipe.autoreconf {
            "autoreconf\n"
        } else {
            ""
        },
        recipe.configure.join(" "),
        recipe.make.join(" ")
    )
}

fn run_step(
    recipe: &Recipe,
    version: &str,
    step: &'static str,
    dir: &Path,
    log_dir: &Path,
    mut cmd: Command,
) -> Result<(), RealBuildError> {
    let log = log_dir.join(format!("{step}.log"));
    let out = File::create(&log).map_err(io_err(&log))?;
    let err = out.try_clone().map_err(io_err(&log))?;
    let status = cmd
        .current_dir(dir)
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(io_err(dir))?;
    if status.success() {
        Ok(())
    } else {
        Err(RealBuildError::Step {
            package: recipe.package,
            version: version.to_string(),
            step,
            status: status
                .code()
                .map_or_else(|| "by a signal".to_string(), |c| c.to_string()),
            log,
        })
    }
}

/// Fetches, builds and instruments `version` of `recipe`, or returns the
/// cached build. Several test processes may ask at once: a lock file
/// serialises them. A refusal of the rewriter keeps the build cached.
pub fn build_real(recipe: &Recipe, version: &str) -> Result<RealBuild, RealBuildError> {
    let dir = cache_dir(recipe, version);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    let tree = dir.join("src");
    let original = tree.join(recipe.binary);
    let instrumented = dir.join(format!("{}.up", recipe.package));
    let stamp_path = dir.join("stamp");
    let want = stamp(recipe, version);
    let built = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == want) && original.is_file();
    let mut build_secs = 0.0;
    if !built {
        let _ = std::fs::remove_file(&stamp_path);
        let started = Instant::now();
        fetch_and_make(recipe, version, &dir, &tree)?;
        build_secs = started.elapsed().as_secs_f64();
        std::fs::write(&stamp_path, &want).map_err(io_err(&stamp_path))?;
    }
    let rewrite_secs = instrument(
        recipe,
        version,
        &original,
        &instrumented,
        built,
        PointsMode::Int3,
    )?;
    Ok(RealBuild {
        tree,
        original,
        instrumented,
        build_secs,
        rewrite_secs,
    })
}

/// Instruments `original` into `instrumented` in `mode`, unless the output
/// is newer than both the build and the rewriter (linked into the running
/// test binary). Returns the seconds the rewriter took (0 when cached).
fn instrument(
    recipe: &Recipe,
    version: &str,
    original: &Path,
    instrumented: &Path,
    built: bool,
    mode: PointsMode,
) -> Result<f64, RealBuildError> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let rewriter = std::env::current_exe().ok().and_then(|p| mtime(&p));
    let up_to_date = match (mtime(original), mtime(instrumented), rewriter) {
        (Some(a), Some(b), Some(r)) => built && a <= b && r <= b,
        _ => false,
    };
    if up_to_date {
        return Ok(0.0);
    }
    let started = Instant::now();
    let bytes = std::fs::read(original).map_err(io_err(original))?;
    let rewritten = upstare_rewriter::rewrite::rewrite_with(&bytes, mode).map_err(|e| {
        RealBuildError::Rewrite {
            package: recipe.package,
            version: version.to_string(),
            binary: original.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    upstare_testkit::write_exe(instrumented, &rewritten.elf, 0o755);
    Ok(secs)
}

/// The cached build of `version` (built first if needed) instrumented with
/// `--inline-points` (update points armed by one flag byte) instead of
/// `int3` arming: `<cache>/<package>.inline.up`.
pub fn build_real_inline(recipe: &Recipe, version: &str) -> Result<RealBuild, RealBuildError> {
    let plain = build_real(recipe, version)?;
    let dir = cache_dir(recipe, version);
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let instrumented = dir.join(format!("{}.inline.up", recipe.package));
    let rewrite_secs = instrument(
        recipe,
        version,
        &plain.original,
        &instrumented,
        true,
        PointsMode::Inline,
    )?;
    Ok(RealBuild {
        instrumented,
        rewrite_secs,
        ..plain
    })
}

/// Another program of a cached build (`binary`, relative to its tree, as
/// a test suite runs it: memcached's `memcached-debug`), instrumented
/// beside the build's own (`<cache>/<file name>.up`), or the cached file.
/// `build` is what [`build_real`] returned for `version` of `recipe`.
pub fn instrument_other(
    recipe: &Recipe,
    version: &str,
    build: &RealBuild,
    binary: &str,
) -> Result<PathBuf, RealBuildError> {
    let dir = cache_dir(recipe, version);
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let original = build.tree.join(binary);
    let name = original
        .file_name()
        .map_or_else(|| binary.to_string(), |n| n.to_string_lossy().into_owned());
    let instrumented = dir.join(format!("{name}.up"));
    instrument(
        recipe,
        version,
        &original,
        &instrumented,
        true,
        PointsMode::Int3,
    )?;
    Ok(instrumented)
}

/// `apt-get source`, `dpkg-source -x`, the recipe's edits, `./configure`
/// and `make`, into `tree`; the logs go to `dir`.
fn fetch_and_make(
    recipe: &Recipe,
    version: &str,
    dir: &Path,
    tree: &Path,
) -> Result<(), RealBuildError> {
    let fetch = dir.join("fetch");
    if fetch.exists() {
        std::fs::remove_dir_all(&fetch).map_err(io_err(&fetch))?;
    }
    std::fs::create_dir_all(&fetch).map_err(io_err(&fetch))?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["source", "--download-only", "-qq"])
        .arg(format!("{}={version}", recipe.package));
    run_step(recipe, version, "apt-get source", &fetch, dir, cmd)?;

    if tree.exists() {
        std::fs::remove_dir_all(tree).map_err(io_err(tree))?;
    }
    let dsc = fetch.join(format!("{}_{}.dsc", recipe.package, file_version(version)));
    let mut cmd = Command::new("dpkg-source");
    cmd.arg("-x").arg(&dsc).arg(tree);
    run_step(recipe, version, "dpkg-source", &fetch, dir, cmd)?;

    for &(file, from, to) in recipe.edits {
        let path = tree.join(file);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        if !text.contains(from) {
            return Err(RealBuildError::Edit {
                package: recipe.package,
                version: version.to_string(),
                file,
                from,
            });
        }
        std::fs::write(&path, text.replace(from, to)).map_err(io_err(&path))?;
    }
    if recipe.autoreconf {
        run_step(
            recipe,
            version,
            "autoreconf",
            tree,
            dir,
            Command::new("autoreconf"),
        )?;
    }
    if !recipe.configure.is_empty() {
        let mut cmd = Command::new("./configure");
        cmd.args(recipe.configure).env("CFLAGS", REAL_CFLAGS);
        run_step(recipe, version, "configure", tree, dir, cmd)?;
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut cmd = Command::new("make");
    cmd.arg(format!("-j{jobs}"))
        .args(recipe.make)
        .env("CFLAGS", REAL_CFLAGS);
    run_step(recipe, version, "make", tree, dir, cmd)
}

/// PostgreSQL 15.18 and its bookworm security update 15.20 (Debian's
/// `postgresql-15` source, Debian's patches applied). Built by upstream
/// `configure` and `make` (the server `postgres`, `initdb`, `psql`,
/// PL/pgSQL and what the regression suite needs: `pg_regress` and
/// `regress.so`), then installed with [`install_postgres`]. Unlike
/// Debian's build: no ICU and no readline (neither is on the path of a
/// server update; psql reads its commands from a pipe), and none of
/// OpenSSL, GSSAPI, LDAP, PAM, libxml, lz4, zstd, systemd, SELinux, LLVM
/// JIT, NLS or the Perl/Python/Tcl languages; the default prefix
/// (`/usr/local/pgsql`, installed under the cache directory: PostgreSQL
/// finds its files relative to its binaries).
pub const POSTGRESQL: RealPair = RealPair {
    recipe: Recipe {
        package: "postgresql-15",
        binary: "src/backend/postgres",
        edits: &[],
        autoreconf: false,
        configure: &["--without-icu", "--without-readline"],
        make: &[],
    },
    old: "15.18-0+deb12u1",
    new: "15.20-0+deb12u1",
};

/// An installed PostgreSQL build ([`install_postgres`]).
#[derive(Clone, Debug)]
pub struct PgInstall {
    /// The build (its tree holds the regression suite).
    pub build: RealBuild,
    /// The installation prefix: `bin/`, `lib/`, `share/`.
    pub prefix: PathBuf,
    /// The instrumented server, installed as `bin/postgres.up` beside the
    /// plain `bin/postgres` (the server finds its `lib/` and `share/`
    /// relative to its own path).
    pub server: PathBuf,
}

impl PgInstall {
    /// A program of the installation (`bin/NAME`).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.prefix.join("bin").join(name)
    }

    /// The directory of the shared libraries the client programs link
    /// (`libpq`): their run path is the configured prefix, not this one.
    pub fn lib(&self) -> PathBuf {
        self.prefix.join("lib")
    }
}

/// Builds ([`build_real`]) and installs PostgreSQL `version` with `make
/// install DESTDIR=<cache>/install`, once per build, and installs the
/// instrumented server beside the plain one when it is newer.
pub fn install_postgres(version: &str) -> Result<PgInstall, RealBuildError> {
    let recipe = &POSTGRESQL.recipe;
    let build = build_real(recipe, version)?;
    let dir = cache_dir(recipe, version);
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    let destdir = dir.join("install");
    let prefix = destdir.join("usr/local/pgsql");
    let done = destdir.join("installed");
    let stamp_path = dir.join("stamp");
    let want = std::fs::read_to_string(&stamp_path).map_err(io_err(&stamp_path))?;
    let installed = std::fs::read_to_string(&done).is_ok_and(|s| s == want);
    if !installed {
        if destdir.exists() {
            std::fs::remove_dir_all(&destdir).map_err(io_err(&destdir))?;
        }
        let mut cmd = Command::new("make");
        cmd.arg("install")
            .arg(format!("DESTDIR={}", destdir.display()));
        run_step(recipe, version, "make install", &build.tree, &dir, cmd)?;
        std::fs::write(&done, &want).map_err(io_err(&done))?;
    }
    let server = prefix.join("bin/postgres.up");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let current = matches!(
        (mtime(&build.instrumented), mtime(&server)),
        (Some(a), Some(b)) if installed && a <= b
    );
    if !current {
        let bytes = std::fs::read(&build.instrumented).map_err(io_err(&build.instrumented))?;
        upstare_testkit::write_exe(&server, &bytes, 0o755);
    }
    Ok(PgInstall {
        build,
        prefix,
        server,
    })
}
