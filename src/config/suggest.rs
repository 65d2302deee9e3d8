//! Help for an unknown key: where it is in the file (its line), and the accepted key of the
//! same table it most likely meant (`tll` -> `ttl`). Accepted keys are the ones
//! `config/example.toml` shows, set or commented out: it lists every key, and a test loads it.

const EXAMPLE: &str = include_str!("../../config/example.toml");

/// Every key the example shows, as its dotted path with account names as `*`.
fn accepted() -> Vec<String> {
    let mut keys = Vec::new();
    let mut table = String::new();
    for line in EXAMPLE.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = wildcard(header.trim_matches(['[', ']']));
            continue;
        }
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            keys.push(if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    keys
}

/// `accounts.greenbox.ttl` -> `accounts.*.ttl`.
fn wildcard(path: &str) -> String {
    let mut parts: Vec<&str> = path.split('.').collect();
    if parts.first() == Some(&"accounts") && parts.len() > 1 {
        parts[1] = "*";
    }
    parts.join(".")
}

/// Edits (insert, delete, substitute, swap neighbours) from `a` to `b`.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The accepted key of the same table closest to the unknown `path`, if one is close.
pub(super) fn did_you_mean(path: &str) -> Option<String> {
    let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
    let pattern = wildcard(table);
    accepted()
        .into_iter()
        .filter_map(|known| {
            let (known_table, known_key) = known.rsplit_once('.').unwrap_or(("", known.as_str()));
            (known_table == pattern).then(|| (distance(key, known_key), known_key.to_owned()))
        })
        .filter(|(d, _)| *d <= 2 && *d < key.len())
        .min()
        .map(|(_, key)| key)
}

/// The 1-based line of `path` (`cache.tll`) in TOML `text`: the key's line within its table.
pub(super) fn line_of(text: &str, path: &str) -> Option<usize> {
    let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = header.trim_matches(['[', ']', ' ']).to_owned();
            continue;
        }
        let Some((found, _)) = line.split_once('=') else {
            continue;
        };
        if current == table && found.trim().trim_matches('"') == key {
            return Some(n + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_gets_its_line_and_the_key_it_meant() {
        assert_eq!(did_you_mean("cache.tll").as_deref(), Some("ttl"));
        assert_eq!(
            did_you_mean("accounts.bluebox.shared_secert").as_deref(),
            Some("shared_secret")
        );
        assert_eq!(did_you_mean("server.lisen").as_deref(), Some("listen"));
        assert_eq!(
            did_you_mean("cache.shared.tiemout").as_deref(),
            Some("timeout")
        );
        assert_eq!(did_you_mean("cache.colour"), None);
        let text = "[server]\nlisten = \"x\"\n[cache]\nttl = \"1s\"\ntll = \"30s\"\n";
        assert_eq!(line_of(text, "cache.tll"), Some(5));
        assert_eq!(line_of(text, "server.tll"), None);
    }
}
