//! Signals as users write them: `SIGTERM`, `TERM`, `term` or `15`.

use std::str::FromStr;

use nix::sys::signal::Signal;

/// The number of the signal `text` names, if it names one.
pub fn number(text: &str) -> Option<i32> {
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).ok().map(|s| s as i32);
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).ok().map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for text in ["SIGUSR1", "USR1", "usr1", "10"] {
            assert_eq!(number(text), Some(10), "{text}");
        }
        assert_eq!(number("SIGTERM"), Some(15));
        for bad in ["", "SIG", "NOPE", "0", "99", "-1", "SIGUSR1 "] {
            assert_eq!(number(bad), None, "{bad:?}");
        }
    }
}
