//! serde glue for humantime durations ("5s", "30m", "1h 30m"), for
//! `#[serde(with = "duration")]` and, for keys whose absence means something,
//! `#[serde(with = "duration::optional")]`.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (write it like \"5s\", \"250ms\", \"30m\")"
        ))
    })
}

pub(super) mod optional {
    use serde::Deserializer;
    use std::time::Duration;

    // Only called when the key is present; the field's `#[serde(default)]` covers absence.
    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::parse;

    #[test]
    fn bad_durations_say_how_to_write_them() {
        let e = parse("[database]\nurl = \"postgres://x@y/z\"\npoll_interval = \"5\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid duration \"5\""), "{e}");
    }
}
