use serde::Serialize;

/// Summary of repeated measurements, in the unit of the samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        } else {
            sorted[mid]
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

/// "median (min-max)" for a table cell, or "-" when nothing was measured.
pub fn cell(summary: &Option<Summary>) -> String {
    summary.as_ref().map_or("-".into(), |s| {
        format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max)
    })
}

/// One runtime's wall time, a row of the container-start tables.
#[derive(Clone, Serialize)]
pub struct WallRow {
    pub runtime: String,
    pub wall_ms: Option<Summary>,
}

/// Prints `rows` as a markdown table of runtime and wall ms.
pub fn print_wall_table(rows: &[WallRow]) {
    println!("| runtime | wall ms |");
    println!("|---|---|");
    for row in rows {
        println!("| {} | {} |", row.runtime, cell(&row.wall_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }
}
