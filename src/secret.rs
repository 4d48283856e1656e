//! [`Secret`]: a value that must never reach a log (database URLs with passwords, ...).
//!
//! Its own module because both `config` (which reads secrets) and `db` (which uses them
//! to connect) need it, and neither should depend on the other for it.

use std::fmt;

/// A value that must never reach a log: `Debug` prints a mask, and there is no `Display`,
/// so a struct holding one can be logged whole.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// The secret itself; call only where it is used, never to print it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_value() {
        let s = Secret::new("postgres://u:s3cret@h/d".to_owned());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "postgres://u:s3cret@h/d");
    }
}
