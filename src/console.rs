//! What pgpushd prints that changes in place: the demo's progress line and
//! `status --watch`'s screen. On a terminal a refresh replaces what was there; anywhere
//! else (a pipe, a file, the journal) each is written after the last, as plain lines
//! without escape sequences, and progress lines at most once a second.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often progress is written where it cannot be replaced.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub struct Console<W: Write> {
    out: W,
    /// Whether `out` is a terminal that understands ANSI escapes.
    terminal: bool,
    /// A progress line is on screen without its newline.
    progress_open: bool,
    last_plain_progress: Option<Instant>,
}

impl Console<io::Stdout> {
    /// Standard output; a terminal unless it is redirected or `TERM=dumb`.
    pub fn stdout() -> Self {
        let terminal =
            io::stdout().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
        Console::new(io::stdout(), terminal)
    }
}

impl<W: Write> Console<W> {
    pub fn new(out: W, terminal: bool) -> Self {
        Console {
            out,
            terminal,
            progress_open: false,
            last_plain_progress: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// A line of its own (ending a progress line first).
    pub fn line(&mut self, text: &str) -> io::Result<()> {
        self.end_progress()?;
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }

    /// A line that replaces the previous progress line on a terminal; elsewhere a line of
    /// its own, at most once a second.
    pub fn progress(&mut self, text: &str) -> io::Result<()> {
        if self.terminal {
            write!(self.out, "\r{text}\x1b[K")?;
            self.progress_open = true;
        } else {
            let now = Instant::now();
            if self
                .last_plain_progress
                .is_some_and(|t| now.duration_since(t) < PLAIN_PROGRESS_EVERY)
            {
                return Ok(());
            }
            self.last_plain_progress = Some(now);
            writeln!(self.out, "{text}")?;
        }
        self.out.flush()
    }

    /// Leaves the progress line as it is and moves below it.
    pub fn end_progress(&mut self) -> io::Result<()> {
        if self.progress_open {
            writeln!(self.out)?;
            self.progress_open = false;
        }
        Ok(())
    }

    /// Replaces the whole screen with `text` on a terminal (line by line from the top,
    /// clearing what is left, so it does not flicker); elsewhere writes it after a blank
    /// line.
    pub fn screen(&mut self, text: &str) -> io::Result<()> {
        if self.terminal {
            write!(self.out, "\x1b[H")?;
            for line in text.lines() {
                writeln!(self.out, "{line}\x1b[K")?;
            }
            write!(self.out, "\x1b[J")?;
        } else {
            writeln!(self.out)?;
            write!(self.out, "{text}")?;
            if !text.ends_with('\n') {
                writeln!(self.out)?;
            }
        }
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A bar of `width` cells, `done` of `total` filled: `[#######.........]`.
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = match total {
        0 => width,
        _ => ((done.min(total) as u128 * width as u128) / total as u128) as usize,
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(c: Console<Vec<u8>>) -> String {
        String::from_utf8(c.into_inner()).unwrap()
    }

    #[test]
    fn on_a_terminal_progress_replaces_itself() {
        let mut c = Console::new(Vec::new(), true);
        c.progress("1 of 3").unwrap();
        c.progress("2 of 3").unwrap();
        c.line("done").unwrap();
        assert_eq!(written(c), "\r1 of 3\x1b[K\r2 of 3\x1b[K\ndone\n");
    }

    #[test]
    fn elsewhere_progress_is_plain_lines_at_most_once_a_second() {
        let mut c = Console::new(Vec::new(), false);
        c.progress("1 of 3").unwrap();
        c.progress("2 of 3").unwrap();
        c.line("done").unwrap();
        assert_eq!(written(c), "1 of 3\ndone\n");
    }

    #[test]
    fn a_screen_overwrites_from_the_top_on_a_terminal_only() {
        let mut c = Console::new(Vec::new(), true);
        c.screen("a\nb\n").unwrap();
        assert_eq!(written(c), "\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J");
        let mut c = Console::new(Vec::new(), false);
        c.screen("a\nb\n").unwrap();
        c.screen("c").unwrap();
        assert_eq!(written(c), "\na\nb\n\nc\n");
    }

    #[test]
    fn bars_fill_in_proportion() {
        assert_eq!(bar(0, 10, 10), "[..........]");
        assert_eq!(bar(5, 10, 10), "[#####.....]");
        assert_eq!(bar(12, 10, 4), "[####]");
        assert_eq!(bar(0, 0, 4), "[####]");
    }
}
