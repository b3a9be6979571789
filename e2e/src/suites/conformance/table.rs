//! The conformance table: image configs crossed with container specs, each
//! row run in Capsa and, as the reference, under crun.

/// What an image's config says about its process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageConfig {
    pub entrypoint: Option<&'static [&'static str]>,
    pub cmd: Option<&'static [&'static str]>,
    pub env: &'static [&'static str],
    pub working_dir: Option<&'static str>,
    pub user: Option<&'static str>,
    pub stop_signal: Option<&'static str>,
}

/// What a container spec overrides (Kubernetes' words: `command` is
/// docker's entrypoint, `args` its cmd).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub command: Option<&'static [&'static str]>,
    pub args: Option<&'static [&'static str]>,
    pub env: &'static [(&'static str, &'static str)],
    pub working_dir: Option<&'static str>,
    pub user: Option<&'static str>,
    pub stop_signal: Option<&'static str>,
}

#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Also the container's and the image's name.
    pub name: &'static str,
    pub image: ImageConfig,
    pub spec: Overrides,
    /// The row is stopped (stop signal, then SIGKILL after the timeout)
    /// once it has reported, rather than left to exit.
    pub stopped: bool,
}

pub const PROBE: &str = "/probe";

/// The image's users: name, uid, gid, home.
pub const USERS: &[(&str, u32, u32, &str)] = &[
    ("root", 0, 0, "/root"),
    ("app", 1000, 1000, "/home/app"),
    ("nobody", 65534, 65534, "/nonexistent"),
];
/// The image's groups: name, gid, members.
pub const GROUPS: &[(&str, u32, &[&str])] = &[
    ("root", 0, &[]),
    ("app", 1000, &[]),
    ("extra", 2000, &["app"]),
    ("nogroup", 65534, &[]),
];

const ENTRY: ImageConfig = ImageConfig {
    entrypoint: Some(&[PROBE]),
    cmd: Some(&["image-cmd", "x"]),
    env: &[],
    working_dir: None,
    user: None,
    stop_signal: None,
};
const CMD_ONLY: ImageConfig = ImageConfig {
    entrypoint: None,
    cmd: Some(&[PROBE, "from-cmd"]),
    ..ENTRY
};
const APP: ImageConfig = ImageConfig {
    entrypoint: Some(&[PROBE, "entry-arg"]),
    cmd: None,
    env: &["MODE=image", "PATH=/bin:/usr/bin", "KEEP=1"],
    working_dir: Some("/home/app"),
    user: Some("app"),
    stop_signal: None,
};
const USR1: ImageConfig = ImageConfig {
    stop_signal: Some("SIGUSR1"),
    ..ENTRY
};
const NONE: Overrides = Overrides {
    command: None,
    args: None,
    env: &[],
    working_dir: None,
    user: None,
    stop_signal: None,
};

const fn row(name: &'static str, image: ImageConfig, spec: Overrides) -> Row {
    Row {
        name,
        image,
        spec,
        stopped: false,
    }
}

const fn stopped(name: &'static str, image: ImageConfig, spec: Overrides) -> Row {
    Row {
        stopped: true,
        ..row(name, image, spec)
    }
}

pub const ROWS: &[Row] = &[
    row("image-process", ENTRY, NONE),
    row(
        "args-replace-cmd",
        ENTRY,
        Overrides {
            args: Some(&["given", "exit=3"]),
            ..NONE
        },
    ),
    row(
        "command-drops-cmd",
        ENTRY,
        Overrides {
            command: Some(&[PROBE, "own"]),
            ..NONE
        },
    ),
    row(
        "command-and-args",
        ENTRY,
        Overrides {
            command: Some(&[PROBE]),
            args: Some(&["a", "b c"]),
            ..NONE
        },
    ),
    row("cmd-only-image", CMD_ONLY, NONE),
    row(
        "args-on-cmd-only",
        CMD_ONLY,
        Overrides {
            args: Some(&[PROBE, "over"]),
            ..NONE
        },
    ),
    row("image-env-dir-user", APP, NONE),
    row(
        "spec-env-dir-uid",
        APP,
        Overrides {
            env: &[("MODE", "spec"), ("NEW", "1"), ("ZED", "last")],
            working_dir: Some("/tmp"),
            user: Some("4242"),
            ..NONE
        },
    ),
    row(
        "user-and-group-names",
        APP,
        Overrides {
            user: Some("app:extra"),
            ..NONE
        },
    ),
    row(
        "numeric-user-group",
        ENTRY,
        Overrides {
            user: Some("1000:65534"),
            ..NONE
        },
    ),
    row(
        "exit-255",
        ENTRY,
        Overrides {
            args: Some(&["exit=255"]),
            ..NONE
        },
    ),
    stopped(
        "stop-sigterm",
        ENTRY,
        Overrides {
            args: Some(&["trap=15", "wait"]),
            ..NONE
        },
    ),
    stopped(
        "stop-image-signal",
        USR1,
        Overrides {
            args: Some(&["trap=10", "wait"]),
            ..NONE
        },
    ),
    stopped(
        "stop-spec-signal",
        USR1,
        Overrides {
            args: Some(&["trap=2", "wait"]),
            stop_signal: Some("SIGINT"),
            ..NONE
        },
    ),
    stopped(
        "stop-ignored-killed",
        ENTRY,
        Overrides {
            args: Some(&["wait"]),
            ..NONE
        },
    ),
];

/// The hostname both runs give the process (Capsa's group is named so).
pub const HOSTNAME: &str = "conf";
/// Seconds between the stop signal and SIGKILL.
pub const STOP_TIMEOUT_SECS: u64 = 3;
