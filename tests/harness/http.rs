//! Plain HTTP on loopback: dropscope's metrics endpoint and Prometheus's API.
use std::{net::TcpListener, time::Duration};

/// A loopback port nothing listens on right now (the kernel picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// GET `url` with optional query parameters: `(status, body)`, or `None` when nothing answers.
pub fn get(url: &str, query: &[(&str, &str)]) -> Option<(u16, String)> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut request = agent.get(url);
    for (k, v) in query {
        request = request.query(*k, *v);
    }
    let mut response = request.call().ok()?;
    let status = response.status().as_u16();
    Some((status, response.body_mut().read_to_string().ok()?))
}

/// The value of the sample `name{labels...}` in a classic Prometheus text exposition (the
/// series whose labels include every one of `labels`; `None` if there is none, a panic if
/// several match).
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let matches = (rest.is_empty() || rest.starts_with('{'))
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().expect("sample value"))
        });
    let first = found.next();
    assert!(
        found.next().is_none(),
        "several {name} series match {labels:?}:\n{exposition}"
    );
    first
}
