//! PM2 ecosystem files on the command line: `start ecosystem.config.js|process.json|*.yaml`
//! and `import FILE > balancer.toml`. This reads the file into JSON (JavaScript through the
//! `node` PM2 users have, exactly as PM2 loads it; JSON as JSON, or as PM2 does when it has
//! comments; YAML with serde) and hands it to [`super::ecosystem`], the pure mapping.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as Json;

use super::ecosystem::{self, Imported};

/// Whether `path` is a PM2 ecosystem file rather than a script: `*.json`, `*.yaml`, `*.yml`,
/// or `*.config.js` / `.cjs` / `.mjs` (PM2's own rule for `start`).
pub(super) fn is_ecosystem(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    [
        ".json",
        ".yaml",
        ".yml",
        ".config.js",
        ".config.cjs",
        ".config.mjs",
    ]
    .iter()
    .any(|end| name.ends_with(end))
}

/// Reads `path` and maps it: the balancer.toml text and the warnings.
pub(super) fn import(path: &Path) -> Result<Imported, String> {
    let source = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = value_of(path, &source)?;
    let dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    ecosystem::to_toml(&value, &source, &dir).map_err(|e| format!("{}: {e}", path.display()))
}

/// The file's value as JSON.
fn value_of(path: &Path, source: &str) -> Result<Json, String> {
    let shown = path.display();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match ext {
        "yaml" | "yml" => {
            serde_norway::from_str(source).map_err(|e| format!("{shown}: invalid YAML: {e}"))
        }
        // PM2 reads `.json` files as JavaScript object literals, so comments are common in
        // them (the seeds' process.json has one); plain JSON needs no node.
        "json" => serde_json::from_str(source).or_else(|json_error| {
            node(path, NODE_JSON5ISH).map_err(|e| {
                format!("{shown}: invalid JSON ({json_error}), and as PM2 reads it: {e}")
            })
        }),
        _ => node(path, NODE_MODULE),
    }
}

/// Loads a module (CommonJS or ES) as PM2 does, and prints its export as JSON.
const NODE_MODULE: &str = "const { pathToFileURL } = require('url');\
    import(pathToFileURL(process.argv[1]).href)\
    .then(m => (m.default !== undefined ? m.default : m))\
    .then(c => process.stdout.write(JSON.stringify(c === undefined ? null : c)))\
    .catch(e => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });";

/// Reads a `.json` file as PM2 does (an object literal, comments allowed), printed as JSON.
const NODE_JSON5ISH: &str = "const text = require('fs').readFileSync(process.argv[1], 'utf8');\
    try { process.stdout.write(JSON.stringify(require('vm').runInNewContext('(' + text + ')'))); }\
    catch (e) { process.stderr.write(String(e && e.message || e)); process.exit(1); }";

/// Runs `node -e script path` and parses what it prints.
fn node(path: &Path, script: &str) -> Result<Json, String> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let out = Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(&absolute)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "{}: reading it needs `node` (as PM2 does): {e}",
                path.display()
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("node failed");
        return Err(format!(
            "{}: node could not load it: {first}",
            path.display()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{}: node printed no JSON: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecosystem_files_are_told_from_scripts() {
        for file in [
            "ecosystem.config.js",
            "x.config.cjs",
            "process.json",
            "apps.yaml",
            "a.yml",
        ] {
            assert!(is_ecosystem(Path::new(file)), "{file}");
        }
        for file in ["app.js", "server.py", "config.js", "balancer.toml"] {
            assert!(!is_ecosystem(Path::new(file)), "{file}");
        }
    }

    #[test]
    fn yaml_and_json_with_comments_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("ecosystem.yaml");
        std::fs::write(
            &yaml,
            "apps:\n  - name: api\n    script: api.py\n    instances: 2\n    pid_file: x.pid\n",
        )
        .unwrap();
        let got = import(&yaml).unwrap();
        assert!(got.toml.contains("name = \"api\""), "{}", got.toml);
        assert!(got.toml.contains("instances = 2"), "{}", got.toml);
        assert!(
            got.warnings[0].starts_with("`pid_file` (app `api`, line 5)"),
            "{:?}",
            got.warnings
        );

        let json = dir.path().join("process.json");
        std::fs::write(
            &json,
            "{\"apps\": [{\"name\": \"a\", // a comment\n \"script\": \"a.js\"}]}",
        )
        .unwrap();
        let got = import(&json).unwrap();
        assert!(got.toml.contains("name = \"a\""), "{}", got.toml);
        std::fs::write(&json, "{not json at all").unwrap();
        assert!(import(&json).unwrap_err().contains("invalid JSON"));
    }
}
