//! What capsa-e2e prints, one JSON line each, and what the runner reads
//! back: a check's verdict, a suite's start and end, and an emulation
//! fault that makes the runner run the suite again on its own.

use serde::{Deserialize, Serialize};

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckLine {
    pub suite: String,
    pub check: String,
    pub ok: bool,
    pub detail: String,
    pub ms: u64,
}

/// Every line capsa-e2e prints on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Check(CheckLine),
    /// A known emulation fault hit the suite (an outer machine that froze
    /// shows as a suite that never ended instead).
    Fault {
        suite: String,
        fault: String,
    },
    /// How far a suite that can pick up where it stopped has come: its
    /// first `done` steps ran and were checked, and `hung` of their
    /// microVMs stopped answering (the nested emulation's). A run after a
    /// freeze starts after them (`capsa-e2e --resume`).
    Progress(ProgressLine),
    SuiteStart {
        suite_start: String,
    },
    SuiteEnd {
        suite_end: String,
        ms: u64,
    },
}

/// A point a suite can be picked up from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u32,
    pub hung: u32,
}

/// A suite's progress, as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressLine {
    pub suite: String,
    #[serde(flatten)]
    pub at: Progress,
}

impl Progress {
    /// `DONE:HUNG`, as `capsa-e2e --resume SUITE=DONE:HUNG` takes it.
    pub fn to_arg(&self) -> String {
        format!("{}:{}", self.done, self.hung)
    }

    pub fn from_arg(text: &str) -> Option<Progress> {
        let (done, hung) = text.split_once(':')?;
        Some(Progress {
            done: done.parse().ok()?,
            hung: hung.parse().ok()?,
        })
    }
}

impl Line {
    /// The line as printed: one JSON object, no newline.
    pub fn to_json(&self) -> String {
        // Plain strings and numbers: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A line of the outer machine's console, when it is one of ours (the
    /// console has the outer kernel's and the VMMs' lines as well, and
    /// QEMU's firmware puts escapes before the first).
    pub fn parse(text: &str) -> Option<Line> {
        let start = text.find('{')?;
        serde_json::from_str(text[start..].trim_end()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_line_round_trips() {
        let lines = [
            Line::Check(CheckLine {
                suite: "boot".into(),
                check: "boot-1cpu: exit 0".into(),
                ok: false,
                detail: "exit 2: \"quoted\"".into(),
                ms: 12,
            }),
            Line::Fault {
                suite: "agent".into(),
                fault: "a microVM triple-faulted".into(),
            },
            Line::Progress(ProgressLine {
                suite: "cycles".into(),
                at: Progress { done: 20, hung: 1 },
            }),
            Line::SuiteStart {
                suite_start: "devices".into(),
            },
            Line::SuiteEnd {
                suite_end: "devices".into(),
                ms: 4,
            },
        ];
        for line in lines {
            assert_eq!(Line::parse(&line.to_json()), Some(line));
        }
    }

    #[test]
    fn a_resume_point_reads_back_from_its_argument() {
        let at = Progress { done: 30, hung: 2 };
        assert_eq!(Progress::from_arg(&at.to_arg()), Some(at));
        assert_eq!(Progress::from_arg("30"), None);
        assert_eq!(Progress::from_arg("x:1"), None);
    }

    #[test]
    fn console_noise_is_not_a_line() {
        assert_eq!(Line::parse("[    1.234] kvm: ready"), None);
        assert_eq!(Line::parse("{not json"), None);
        assert_eq!(Line::parse("{\"other\": 1}"), None);
        let escaped = format!(
            "\x1b[2J\x1b[1;1H{}",
            Line::SuiteStart {
                suite_start: "boot".into()
            }
            .to_json()
        );
        assert!(Line::parse(&escaped).is_some());
    }
}
