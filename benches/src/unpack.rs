//! OCI layer import speed: capsa-layers (sha256 of the blob and of the
//! tar, decompression, unpack into overlay form, commit) on a synthetic
//! layer, uncompressed, gzip and zstd, next to GNU tar extracting the same
//! files (which checks no digest). MB/s of uncompressed tar.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsa_layers::{Compression, Digest, LayerSpec, LayerStore};
use serde::Serialize;

use crate::stats::{cell, Summary};

#[derive(clap::Args)]
pub struct UnpackArgs {
    /// Measurements per format and tool.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Total file content in the layer, MiB.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Files in the layer.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Scratch directory (default: a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    format: &'static str,
    blob_bytes: u64,
    capsa_mb_s: Option<Summary>,
    gnu_tar_mb_s: Option<Summary>,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    files: usize,
    tar_bytes: u64,
    rows: Vec<Row>,
}

/// Content that compresses about as well as binaries and text in images
/// do (about 2:1), from a fixed seed.
fn synthetic_layer(mib: usize, files: usize) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let per_file = (mib << 20) / files.max(1);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let words: &[&[u8]] = &[
        b"capsa ",
        b"layer ",
        b"overlay ",
        b"vsock ",
        b"\n",
        b"0x7f45 ",
    ];
    for index in 0..files {
        let mut data = Vec::with_capacity(per_file);
        while data.len() < per_file {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state.is_multiple_of(2) {
                data.extend_from_slice(words[(state >> 8) as usize % words.len()]);
            } else {
                data.extend_from_slice(&state.to_le_bytes());
            }
        }
        data.truncate(per_file);
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        let path = format!("usr/share/d{:03}/file{index:05}", index % 100);
        builder.append_data(&mut header, path, data.as_slice())?;
    }
    Ok(builder.into_inner()?)
}

fn capsa_import(spec: &LayerSpec, blob: &Path, store_dir: &Path) -> Result<Duration> {
    let _ = fs::remove_dir_all(store_dir);
    let started = Instant::now();
    let store = LayerStore::open(store_dir)?;
    store.import(spec, fs::File::open(blob)?)?;
    Ok(started.elapsed())
}

fn gnu_tar(flags: &[&str], blob: &Path, target: &Path) -> Result<Duration> {
    let _ = fs::remove_dir_all(target);
    fs::create_dir_all(target)?;
    let started = Instant::now();
    let status = Command::new("tar")
        .args(flags)
        .arg(blob)
        .arg("-C")
        .arg(target)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar {flags:?} failed: {status}");
    }
    Ok(started.elapsed())
}

fn have_zstd() -> bool {
    Command::new("zstd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn run(args: &UnpackArgs) -> Result<()> {
    let (_temp, dir) = crate::workdir::scratch(&args.work_dir)?;
    let tar = synthetic_layer(args.mib, args.files)?;
    let diff_id = Digest::of(&tar);
    let gzip = {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&tar)?;
        encoder.finish()?
    };
    let zstd = zstd::encode_all(tar.as_slice(), 3)?;
    let formats: [(&str, Compression, Vec<u8>, &[&str]); 3] = [
        ("tar", Compression::None, tar.clone(), &["-xf"]),
        ("tar+gzip", Compression::Gzip, gzip, &["-xzf"]),
        ("tar+zstd", Compression::Zstd, zstd, &["--zstd", "-xf"]),
    ];
    let zstd_tool = have_zstd();
    let mb = tar.len() as f64 / 1e6;
    let mut rows = Vec::new();
    for (format, compression, blob, tar_flags) in formats {
        let blob_path = dir.join(format!("layer.{format}"));
        fs::write(&blob_path, &blob)?;
        let spec = LayerSpec {
            digest: Digest::of(&blob),
            diff_id,
            compression,
            size: Some(blob.len() as u64),
            parent: None,
        };
        let mut capsa = Vec::new();
        let mut gnu = Vec::new();
        for _ in 0..args.runs {
            let took = capsa_import(&spec, &blob_path, &dir.join("store"))?;
            capsa.push(mb / took.as_secs_f64());
            if compression != Compression::Zstd || zstd_tool {
                let took = gnu_tar(tar_flags, &blob_path, &dir.join("tar-out"))?;
                gnu.push(mb / took.as_secs_f64());
            }
        }
        eprintln!("unpack {format}: capsa {capsa:.1?} MB/s, GNU tar {gnu:.1?} MB/s");
        rows.push(Row {
            format,
            blob_bytes: blob.len() as u64,
            capsa_mb_s: Summary::of(&capsa),
            gnu_tar_mb_s: Summary::of(&gnu),
        });
        fs::remove_file(&blob_path)?;
    }
    let _ = fs::remove_dir_all(dir.join("store"));
    let _ = fs::remove_dir_all(dir.join("tar-out"));

    println!(
        "layer import, {} files, {:.1} MB of tar; MB/s of uncompressed tar, median (min-max) of {} runs",
        args.files, mb, args.runs
    );
    println!("| format | blob MB | capsa-layers (verify + unpack) | GNU tar (no verification) |");
    println!("|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {:.1} | {} | {} |",
            row.format,
            row.blob_bytes as f64 / 1e6,
            cell(&row.capsa_mb_s),
            cell(&row.gnu_tar_mb_s)
        );
    }
    let report = Report {
        runs: args.runs,
        files: args.files,
        tar_bytes: tar.len() as u64,
        rows,
    };
    crate::write_json(
        args.json
            .as_deref()
            .unwrap_or(&crate::default_json("unpack")),
        &report,
    )
}
