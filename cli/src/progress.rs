//! Pull and import progress: on a terminal, a bar per blob with its bytes
//! and rate (indicatif) and the daemon's lines above them; elsewhere the
//! lines alone, one per blob stored, for logs and scripts.

use std::collections::HashMap;
use std::io::IsTerminal;

use capsa_cli::client::Note;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct Bars {
    multi: Option<MultiProgress>,
    bars: HashMap<String, ProgressBar>,
}

impl Bars {
    pub fn new() -> Bars {
        Bars {
            multi: std::io::stderr().is_terminal().then(MultiProgress::new),
            bars: HashMap::new(),
        }
    }

    pub fn note(&mut self, note: Note) {
        let Some(multi) = &self.multi else {
            if let Note::Line(text) = note {
                eprintln!("{text}");
            }
            return;
        };
        match note {
            Note::Line(text) => {
                // A blob's line says it is done: its bar goes.
                self.bars.retain(|id, bar| {
                    let done = text.starts_with(id.as_str());
                    if done {
                        bar.finish_and_clear();
                        multi.remove(bar);
                    }
                    !done
                });
                let _ = multi.println(text);
            }
            Note::Transfer(moved) => {
                let bar = self.bars.entry(moved.id.clone()).or_insert_with(|| {
                    let style = ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    let short = moved.id.trim_start_matches("sha256:");
                    multi.add(
                        ProgressBar::new(moved.total)
                            .with_style(style)
                            .with_prefix(short[..short.len().min(12)].to_string()),
                    )
                });
                bar.set_length(moved.total);
                bar.set_position(moved.done);
            }
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        for bar in self.bars.values() {
            bar.finish_and_clear();
        }
    }
}
