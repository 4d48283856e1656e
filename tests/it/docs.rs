//! The documentation cannot drift: `docs/configuration.md` (the reference), the example
//! config `systemd/pgpushd.toml` and the parser in `src/config/` name the same keys in
//! the same sections, the reference's defaults are the example's values, and every
//! relative link in `README.md`, `ARCHITECTURE.md` and `docs/*.md` resolves.
//!
//! Sections are normalised: `[apps.default]`, `[apps.legacy]`, ... are all `apps.NAME`,
//! and `[apps.default.token]` is `apps.NAME.token`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pgpushd::config::Config;

/// Section (normalised, `""` for the top level) -> its keys.
type Keys = BTreeMap<String, BTreeSet<String>>;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `apps.default.token` -> `apps.NAME.token`.
fn normalise(section: &str) -> String {
    let mut parts: Vec<&str> = section.split('.').map(str::trim).collect();
    if parts.len() >= 2 && parts[0] == "apps" {
        parts[1] = "NAME";
    }
    parts.join(".")
}

/// A key name as TOML configs here write them.
fn is_key(word: &str) -> bool {
    !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

// ---- the example config ----------------------------------------------------------------

/// A line of the example, with one leading `#` (a commented-out key or section) removed.
/// Lines commented twice (`# # ...`) are prose inside a commented block.
fn uncomment(line: &str) -> (&str, bool) {
    let line = line.trim();
    match line.strip_prefix('#') {
        Some(rest) if !rest.trim_start().starts_with('#') => (rest.trim(), true),
        Some(_) => ("", true),
        None => (line, false),
    }
}

/// `[section]` lines and `key = value` lines, commented out or not, per section; and the
/// set keys' values (uncommented lines only), per `section.key`.
fn example_keys(text: &str) -> (Keys, BTreeMap<String, String>) {
    let mut keys = Keys::new();
    let mut values = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let (line, commented) = uncomment(line);
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = normalise(name);
            keys.entry(section.clone()).or_default();
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        if !is_key(key) {
            continue;
        }
        keys.entry(section.clone())
            .or_default()
            .insert(key.to_owned());
        if !commented {
            let value = value.split(" #").next().unwrap().trim();
            values.insert(format!("{section}.{key}"), value.to_owned());
        }
    }
    (keys, values)
}

// ---- the reference ---------------------------------------------------------------------

/// Sections are headings `## `[name]``; their keys are the first column of the table whose
/// header starts with `| key |`. Returns the keys and each key's default cell.
fn reference_keys(text: &str) -> (Keys, BTreeMap<String, String>) {
    let mut keys = Keys::new();
    let mut defaults = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut in_key_table = false;
    for line in text.lines() {
        if line.starts_with('#') {
            let title = line.trim_start_matches('#').trim();
            section = title
                .strip_prefix("`[")
                .and_then(|t| t.strip_suffix("]`"))
                .map(normalise);
            if let Some(s) = &section {
                assert!(
                    keys.insert(s.clone(), BTreeSet::new()).is_none(),
                    "docs/configuration.md: section [{s}] appears twice"
                );
            }
            in_key_table = false;
            continue;
        }
        if !line.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.get(1) == Some(&"key") {
            in_key_table = true;
            continue;
        }
        let (Some(s), true) = (&section, in_key_table) else {
            continue;
        };
        let cell = cells[1];
        if cell.starts_with("---") {
            continue;
        }
        let key = cell
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .filter(|k| is_key(k))
            .unwrap_or_else(|| {
                panic!("docs/configuration.md [{s}]: {cell:?} is not a `key` in backticks")
            });
        assert!(
            keys.get_mut(s).unwrap().insert(key.to_owned()),
            "docs/configuration.md: [{s}] {key} is listed twice"
        );
        defaults.insert(format!("{s}.{key}"), cells[2].to_owned());
    }
    (keys, defaults)
}

// ---- the parser ------------------------------------------------------------------------

/// The fields the parser accepts in `section`, read from its "unknown field" error: the
/// section's keys plus the names of its subsections.
fn parser_fields(section: &str) -> BTreeSet<String> {
    let header = match section {
        "" => String::new(),
        s => format!("[{}]\n", s.replace("NAME", "probe")),
    };
    let text = format!("{header}zz_not_a_key = 1\n");
    let err = Config::from_file_str(Path::new("probe.toml"), &text, None)
        .err()
        .unwrap_or_else(|| panic!("[{section}] accepted an unknown key"))
        .to_string();
    let expected = err
        .split_once("unknown field `zz_not_a_key`, expected")
        .unwrap_or_else(|| panic!("[{section}]: not an unknown-field error: {err}"))
        .1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// What the parser should list for `section`: its keys and its direct subsections.
fn fields_of(keys: &Keys, section: &str) -> BTreeSet<String> {
    let mut fields = keys.get(section).cloned().unwrap_or_default();
    for other in keys.keys() {
        let rest = match section {
            "" => Some(other.as_str()),
            s => other.strip_prefix(s).and_then(|r| r.strip_prefix('.')),
        };
        if let Some(rest) = rest.filter(|r| !r.is_empty()) {
            let child = rest.split('.').next().unwrap();
            // `apps` is a table of apps, not a section: its child is `NAME`.
            if child != "NAME" {
                fields.insert(child.to_owned());
            }
        }
    }
    fields
}

#[test]
fn the_reference_the_example_and_the_parser_name_the_same_keys() {
    let (example_text, reference_text) =
        (read("systemd/pgpushd.toml"), read("docs/configuration.md"));
    Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), &example_text, None)
        .unwrap_or_else(|e| panic!("systemd/pgpushd.toml: {e}"));
    let (example, values) = example_keys(&example_text);
    let (reference, defaults) = reference_keys(&reference_text);

    // A scanner that misread the example would make the comparison meaningless: what
    // TOML itself finds (the uncommented part) must be among what the scanner found.
    let parsed: toml::Table = example_text.parse().unwrap();
    fn walk(table: &toml::Table, section: &str, out: &mut Keys) {
        for (k, v) in table {
            let path = if section.is_empty() {
                k.clone()
            } else {
                format!("{section}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(t, &path, out),
                _ => {
                    out.entry(normalise(section)).or_default().insert(k.clone());
                }
            }
        }
    }
    let mut uncommented = Keys::new();
    walk(&parsed, "", &mut uncommented);
    for (section, keys) in &uncommented {
        let scanned = example.get(section).cloned().unwrap_or_default();
        assert!(
            keys.is_subset(&scanned),
            "the scanner missed keys of [{section}]: {keys:?} vs {scanned:?}"
        );
    }

    // Same sections, same keys per section.
    let sections = |k: &Keys| k.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        sections(&reference),
        sections(&example),
        "sections: docs/configuration.md (left) and systemd/pgpushd.toml (right) differ"
    );
    for (section, keys) in &reference {
        assert_eq!(
            keys, &example[section],
            "[{section}]: docs/configuration.md (left) and systemd/pgpushd.toml (right) \
             name different keys"
        );
    }

    // And the parser accepts exactly those keys, in exactly those sections.
    let mut probed = vec![String::new()];
    probed.extend(reference.keys().filter(|s| *s != "apps").cloned());
    for section in probed {
        assert_eq!(
            fields_of(&reference, &section),
            parser_fields(&section),
            "[{section}]: docs/configuration.md (left) and src/config/ (right) differ"
        );
    }

    // The example sets keys at their defaults (tests/systemd.rs checks that against the
    // parser): where the reference gives a default literally, it must be the same value.
    let mut compared = 0;
    for (key, value) in &values {
        let Some(default) = defaults.get(key) else {
            continue;
        };
        if let Some(literal) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) {
            assert_eq!(
                literal, value,
                "{key}: the default in docs/configuration.md (left) is not the value in \
                 systemd/pgpushd.toml (right)"
            );
            compared += 1;
        }
    }
    assert!(compared >= 10, "only {compared} defaults compared");
}

#[test]
fn the_readme_minimal_config_parses() {
    let readme = read("README.md");
    let block = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```toml block");
    let config = Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), block, None)
        .unwrap_or_else(|e| panic!("README.md's config: {e}"));
    assert_eq!(config.apps.len(), 1);
}

// ---- links -----------------------------------------------------------------------------

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of a Markdown file outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut out = BTreeSet::new();
    for line in prose(text) {
        if !line.starts_with('#') {
            continue;
        }
        let s = slug(line.trim_start_matches('#'));
        let n = seen.entry(s.clone()).or_default();
        out.insert(if *n == 0 {
            s.clone()
        } else {
            format!("{s}-{n}")
        });
        *n += 1;
    }
    out
}

/// `[text](target)` targets, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let mut files = vec![PathBuf::from("README.md"), PathBuf::from("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(root()).unwrap().to_owned())
        .collect();
    docs.sort();
    assert!(docs.len() >= 4, "{docs:?}");
    files.extend(docs);

    let mut checked = 0;
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file.to_str().unwrap());
        let dir = file.parent().unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let full = root().join(&target);
            checked += 1;
            if !full.exists() {
                broken.push(format!(
                    "{}: {link}: no {}",
                    file.display(),
                    target.display()
                ));
                continue;
            }
            if let Some(anchor) = anchor {
                if full.extension().is_some_and(|e| e == "md") {
                    let text = std::fs::read_to_string(&full).unwrap();
                    if !anchors(&text).contains(anchor) {
                        broken.push(format!(
                            "{}: {link}: no heading #{anchor} in {}",
                            file.display(),
                            target.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 20, "only {checked} links checked");
}
