//! Progress bars for long CLI operations (import, export, fsck): drawn on stderr only when it
//! is a terminal and `--quiet` was not given.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress bars for the rest of the process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar of `len` units drawn with indicatif `template`, or a hidden one.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    let visible =
        !QUIET.load(Ordering::Relaxed) && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if visible {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Prints `line` on stdout above `bar` (indicatif's own `println` prints nothing while the bar is
/// hidden, which would swallow e.g. fsck's findings off a terminal).
pub fn println(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        println!("{}", line.as_ref());
    } else {
        bar.println(line);
    }
}
