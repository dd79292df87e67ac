//! A real Prometheus server on loopback, scraping one target every second, with its own
//! configuration and storage in a temporary directory (the Debian service stays off).
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use serde_json::Value;

use crate::{
    http::{free_port, get},
    observer::temp_path,
    wait_for,
};

/// A running Prometheus, stopped and removed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// Base URL of its web API.
    pub url: String,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` (`host:port`) every second and waits until it is
    /// ready.
    pub fn start(target: &str) -> Self {
        let dir = temp_path("dropscope-prometheus");
        fs::create_dir_all(&dir).expect("prometheus directory");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: dropscope\n    static_configs:\n      - targets: ['{target}']\n"
        );
        fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        let url = format!("http://127.0.0.1:{}", free_port());
        let log = fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!(
                "--web.listen-address={}",
                url.trim_start_matches("http://")
            ))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (cargo xtask test installs it)");
        let mut prometheus = Prometheus { child, dir, url };
        wait_for("prometheus to be ready", 60.0, || {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}): {}", prometheus.log());
            }
            matches!(
                get(&format!("{}/-/ready", prometheus.url), &[]),
                Some((200, _))
            )
        });
        prometheus
    }

    /// What Prometheus logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: each series as (its labels, its value).
    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let (status, body) = get(&format!("{}/api/v1/query", self.url), &[("query", promql)])
            .expect("prometheus answers");
        let json: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(
            (status, &json["status"]),
            (200, &Value::from("success")),
            "{promql}: {body}"
        );
        json["data"]["result"]
            .as_array()
            .expect("vector result")
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .expect("sample value"),
                )
            })
            .collect()
    }

    /// The value of the single series `selector` in a scrape that started after `after`
    /// (Unix seconds), waiting up to `secs` for Prometheus to store one.
    pub fn scraped_after(&self, selector: &str, after: f64, secs: f64) -> f64 {
        let mut last = Vec::new();
        wait_for(
            &format!("a scrape of {selector} after {after}"),
            secs,
            || {
                last = self.query(&format!("timestamp({selector})"));
                last.len() == 1 && last[0].1 > after
            },
        );
        let values = self.query(selector);
        assert_eq!(values.len(), 1, "one series for {selector}: {values:?}");
        values[0].1
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
