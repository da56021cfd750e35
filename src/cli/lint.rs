//! `dormant policy lint FILE...`

use std::io::Read;

use crate::policy::lint::{LintReport, lint};

/// Lints each file (`-` for standard input); prints every problem to
/// `err` and a summary to `out`. Returns true when all is well.
pub fn run(
    files: &[String],
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> std::io::Result<bool> {
    let mut total = LintReport::default();
    for file in files {
        let text = if file == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(file)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                writeln!(err, "{file}: cannot read: {e}")?;
                total.errors.push(crate::policy::lint::LintError {
                    file: file.clone(),
                    document: 0,
                    object: None,
                    field: "(file)".into(),
                    message: e.to_string(),
                });
                continue;
            }
        };
        let name = if file == "-" { "<stdin>" } else { file.as_str() };
        let report = lint(name, &text);
        for e in &report.errors {
            writeln!(err, "{e}")?;
        }
        for w in &report.warnings {
            writeln!(err, "warning: {w}")?;
        }
        total.policies += report.policies;
        total.annotated_objects += report.annotated_objects;
        total.errors.extend(report.errors);
        total.warnings.extend(report.warnings);
    }
    writeln!(
        out,
        "{} SleepPolicy document(s), {} annotated object(s): {}",
        total.policies,
        total.annotated_objects,
        match (total.errors.len(), total.warnings.len()) {
            (0, 0) => "ok".to_string(),
            (0, w) => format!("ok, {w} warning(s)"),
            (e, _) => format!("{e} error(s)"),
        }
    )?;
    Ok(total.errors.is_empty())
}
