//! The two text formats of `/metrics`. Prometheus asks for OpenMetrics, which the client
//! library writes; other clients (curl, `promtool check metrics`) get the classic Prometheus
//! text format, which differs for our metrics only in how counter families are named.
use prometheus_client::{encoding::text::encode, registry::Registry};

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in the format the `Accept` header asks for, with its content type.
pub fn render(
    registry: &Registry,
    accept: Option<&str>,
) -> Result<(&'static str, String), std::fmt::Error> {
    let mut text = String::new();
    encode(&mut text, registry)?;
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        return Ok((OPENMETRICS, text));
    }
    Ok((CLASSIC, classic(&text)))
}

/// OpenMetrics text -> classic text: a counter family is named after its samples
/// (`x_total`, where OpenMetrics says `x`), and there is no `# EOF` or `# UNIT`.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        // HELP comes before TYPE, and its name depends on the type.
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map(|(_, text)| text);
            continue;
        }
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(text) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

    use super::*;

    #[test]
    fn clients_get_the_format_they_ask_for() {
        let mut registry = Registry::with_prefix("t");
        let c = Counter::<u64>::default();
        c.inc_by(3);
        registry.register("drops", "Drops", c);
        registry.register("up_info", "Up", Gauge::<i64>::default());
        let (kind, om) = render(
            &registry,
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        )
        .unwrap();
        assert_eq!(kind, OPENMETRICS);
        assert!(
            om.contains("# TYPE t_drops counter\nt_drops_total 3\n") && om.ends_with("# EOF\n"),
            "{om}"
        );
        let (kind, text) = render(&registry, None).unwrap();
        assert_eq!(kind, CLASSIC);
        assert_eq!(
            text,
            "# HELP t_drops_total Drops.\n# TYPE t_drops_total counter\nt_drops_total 3\n\
             # HELP t_up_info Up.\n# TYPE t_up_info gauge\nt_up_info 0\n"
        );
    }
}
