//! The Kubernetes manifests (deploy/k8s, SPEC §8) against the real `kanade-ingest --help`: every
//! flag they pass to ingest and every environment variable they set for it must be one the
//! binary documents, so renaming a flag breaks this test instead of a rollout. `.ci/run` renders
//! and schema-checks the same manifests; this test checks what a schema cannot: our own CLI.
//!
//! The manifests are read as text, line by line, relying on how they are written (block style,
//! two-space indentation): a document belongs to ingest when its `metadata.name` starts with
//! `kanade-ingest`; its flags are the `--…` words outside comments; its variables are the
//! `- name:` items of `env:` lists, plus the keys of the `*.env` files that feed ingest's
//! ConfigMap.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use kanade_testkit::workspace_binary;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

fn files_under(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
    {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files_under(&path, found);
        } else {
            found.push(path);
        }
    }
}

fn manifest_files(extension: &str) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&k8s_dir(), &mut all);
    all.retain(|p| p.extension().is_some_and(|e| e == extension));
    all.sort();
    all
}

/// The line without its comment (`#` at the start or after a space; none of our values holds one).
fn uncommented(line: &str) -> &str {
    if line.trim_start().starts_with('#') {
        return "";
    }
    line.find(" #").map_or(line, |at| &line[..at])
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The YAML documents of every manifest whose `metadata.name` starts with `kanade-ingest`.
fn ingest_documents() -> Vec<(PathBuf, Vec<String>)> {
    let mut docs = Vec::new();
    for path in manifest_files("yaml") {
        let text = std::fs::read_to_string(&path).expect("reading a manifest");
        let mut lines: Vec<String> = Vec::new();
        for line in text.lines().chain(std::iter::once("---")) {
            if line.trim_end() == "---" {
                let doc = std::mem::take(&mut lines);
                if metadata_name(&doc).is_some_and(|n| n.starts_with("kanade-ingest")) {
                    docs.push((path.clone(), doc));
                }
            } else {
                lines.push(uncommented(line).trim_end().to_string());
            }
        }
    }
    docs
}

fn metadata_name(doc: &[String]) -> Option<&str> {
    let at = doc.iter().position(|l| l == "metadata:")?;
    doc[at + 1..]
        .iter()
        .take_while(|l| l.is_empty() || indent(l) > 0)
        .find_map(|l| l.strip_prefix("  name: "))
        .map(|n| n.trim().trim_matches('"'))
}

/// `--flag` words in a document, without their `=value`.
fn flags_in(doc: &[String]) -> BTreeSet<String> {
    doc.iter()
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || "\"'[],".contains(c)))
        .filter(|w| w.starts_with("--") && w[2..].starts_with(|c: char| c.is_ascii_alphabetic()))
        .map(|w| w.split('=').next().unwrap_or(w).to_string())
        .collect()
}

/// Names of the `- name:` items whose parent key is `env:`.
fn env_names_in(doc: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, line) in doc.iter().enumerate() {
        let Some(name) = line.trim_start().strip_prefix("- name: ") else {
            continue;
        };
        let parent = doc[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty() && indent(l) < indent(line));
        if parent.is_some_and(|p| p.trim() == "env:") {
            names.insert(name.trim().trim_matches('"').to_string());
        }
    }
    names
}

fn env_file_keys() -> BTreeSet<String> {
    manifest_files("env")
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .expect("reading an env file")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn ingest_help() -> String {
    let out = Command::new(workspace_binary("kanade-ingest"))
        .arg("--help")
        .output()
        .expect("running kanade-ingest --help");
    assert!(out.status.success(), "kanade-ingest --help failed");
    String::from_utf8(out.stdout).expect("--help is UTF-8")
}

fn help_flags(help: &str) -> BTreeSet<String> {
    flags_in(&help.lines().map(str::to_string).collect::<Vec<_>>())
}

/// The variables clap documents as `[env: NAME=]`.
fn help_env_names(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(name, _)| name.to_string()))
        .collect()
}

#[test]
fn every_flag_the_manifests_pass_to_ingest_is_in_its_help() {
    let known = help_flags(&ingest_help());
    let docs = ingest_documents();
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (path, doc) in &docs {
        for flag in flags_in(doc) {
            if !known.contains(&flag) {
                unknown.push(format!("{flag} in {}", path.display()));
            }
            used.insert(flag);
        }
    }
    assert!(
        used.contains("--health-listen") && used.contains("--listen"),
        "the manifests should pass --listen and --health-listen to ingest; found {used:?} in {} documents",
        docs.len()
    );
    assert!(
        unknown.is_empty(),
        "flags the manifests use that `kanade-ingest --help` does not show: {unknown:#?}"
    );
}

#[test]
fn every_variable_the_manifests_set_for_ingest_is_documented() {
    let known = help_env_names(&ingest_help());
    assert!(
        known.contains("DATABASE_URL"),
        "--help documents no [env: DATABASE_URL=]"
    );
    let mut used = env_file_keys();
    for (_, doc) in ingest_documents() {
        used.extend(env_names_in(&doc));
    }
    assert!(
        used.contains("DATABASE_URL") && used.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "the manifests should set DATABASE_URL and OTEL_EXPORTER_OTLP_ENDPOINT; found {used:?}"
    );
    let unknown: Vec<_> = used
        .iter()
        .filter(|name| !known.contains(*name) && !name.starts_with("OTEL_"))
        .collect();
    assert!(
        unknown.is_empty(),
        "variables the manifests set for ingest that `kanade-ingest --help` does not document: {unknown:?}"
    );
}

#[test]
fn the_pod_outlives_the_drain() {
    let (_, deployment) = ingest_documents()
        .into_iter()
        .find(|(path, doc)| {
            path.ends_with("base/deployment.yaml") && doc.contains(&"kind: Deployment".to_string())
        })
        .expect("base/deployment.yaml holds the Deployment");
    let value = |prefix: &str| -> u64 {
        deployment
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .and_then(|v| v.trim().trim_end_matches('s').parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}…` in base/deployment.yaml"))
    };
    let grace = value("terminationGracePeriodSeconds: ");
    let drain = value("- --shutdown-timeout=");
    let pre_stop = value("seconds: ");
    assert!(
        grace > drain + pre_stop,
        "terminationGracePeriodSeconds ({grace}) must exceed the preStop sleep ({pre_stop}) plus --shutdown-timeout ({drain})"
    );
}

/// Every `kanade_ingest_…` series name in `text`.
fn series_named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kanade_ingest_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The alert rules and the Grafana dashboard (deploy/observability) must use series ingest
/// serves: a renamed metric breaks this test instead of silencing an alert.
#[test]
fn the_alerts_and_the_dashboard_use_only_metrics_ingest_serves() {
    use kanade_ingest::metrics::{Metrics, reject};
    let metrics = Metrics::default();
    // Families with labels are rendered once they have a child.
    metrics.rejected(reject::INVALID);
    metrics.store_error("unavailable");
    metrics.cancel_request("requested");
    metrics.tail_chunk("delivered");
    metrics.fleet(&kanade_ingest::store::FleetTotals::default());
    let served: BTreeSet<String> = metrics
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability");
    for file in ["alerts.yaml", "alerts_test.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("reading an observability file");
        let used = series_named_in(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses series ingest does not serve: {unknown:?}"
        );
    }
}
