//! The console in headless Chromium (Debian's `chromium` and `chromium-driver`; install
//! them with `scripts/install-chromium.sh`; the test fails when they are missing), driven
//! over WebDriver against a real worker's dead letters on RabbitMQ and NATS: the login
//! page, the failure group with its count, a dead letter, the replay's dry run and its
//! confirmation bringing every message back to the handler, and the login again once the
//! session cookie is gone. With `STEADFAST_CONSOLE_SCREENSHOTS=DIR` it saves the pages'
//! screenshots there (the ones in `docs/console/`).

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "browser-test-token-0123456789";

/// One WebDriver command: the `value` of its JSON answer, which must not be an error.
async fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let v = wd_any(port, method, path, body).await;
    assert!(v.get("error").is_none(), "{method} {path}: {v}");
    v
}

/// One WebDriver command: the `value` of its JSON answer, an error included.
async fn wd_any(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("chromedriver listens");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // chromedriver keeps the connection open: read the head, then Content-Length bytes.
    let read = async {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= len || n == 0 {
                    return text;
                }
            } else if n == 0 {
                return text;
            }
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("chromedriver answers within 60 s");
    let json = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    let (a, b) = (
        json.find('{').unwrap_or(0),
        json.rfind('}').map_or(0, |i| i + 1),
    );
    let v: Value = serde_json::from_str(&json[a..b])
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    v["value"].clone()
}

struct Browser {
    port: u16,
    session: String,
    shots: Option<std::path::PathBuf>,
}

impl Browser {
    async fn go(&self, url: &str) {
        wd(
            self.port,
            "POST",
            &format!("/session/{}/url", self.session),
            Some(serde_json::json!({ "url": url })),
        )
        .await;
    }
    async fn source(&self) -> String {
        wd(
            self.port,
            "GET",
            &format!("/session/{}/source", self.session),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }
    async fn url(&self) -> String {
        wd(
            self.port,
            "GET",
            &format!("/session/{}/url", self.session),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }
    async fn find(&self, css: &str) -> String {
        let v = wd(
            self.port,
            "POST",
            &format!("/session/{}/element", self.session),
            Some(serde_json::json!({ "using": "css selector", "value": css })),
        )
        .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_owned()
    }
    async fn script(&self, js: &str) -> Value {
        wd(
            self.port,
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(serde_json::json!({ "script": js, "args": [] })),
        )
        .await
    }
    /// Clicks what submits a form or follows a link, then waits until the next page has
    /// loaded: WebDriver's click may return before a form's POST has answered, and the
    /// page read next would be the old one (seen under load).
    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.script("window.__steadfastOldPage = true;").await;
        wd(
            self.port,
            "POST",
            &format!("/session/{}/element/{e}/click", self.session),
            Some(serde_json::json!({})),
        )
        .await;
        let loaded = async {
            loop {
                // While the page changes the script may fail ("no such execution
                // context"): not loaded yet.
                let v = wd_any(
                    self.port,
                    "POST",
                    &format!("/session/{}/execute/sync", self.session),
                    Some(serde_json::json!({
                        "script": "return !window.__steadfastOldPage && document.readyState === 'complete';",
                        "args": [],
                    })),
                )
                .await;
                if v == Value::Bool(true) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), loaded)
            .await
            .unwrap_or_else(|_| panic!("clicking {css} loaded no new page within 30 s"));
    }
    async fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        wd(
            self.port,
            "POST",
            &format!("/session/{}/element/{e}/value", self.session),
            Some(serde_json::json!({ "text": text })),
        )
        .await;
    }
    async fn shot(&self, name: &str) {
        let Some(dir) = &self.shots else { return };
        let png = wd(
            self.port,
            "GET",
            &format!("/session/{}/screenshot", self.session),
            None,
        )
        .await;
        let bytes = base64_decode::decode(png.as_str().unwrap());
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }
}

/// Standard base64 (the screenshots), without a dependency for it.
mod base64_decode {
    pub(super) fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let clean: Vec<u8> = s
            .bytes()
            .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
            .collect();
        let mut out = Vec::with_capacity(clean.len() * 3 / 4);
        for chunk in clean.chunks(4) {
            let mut n = 0u32;
            for (i, c) in chunk.iter().enumerate() {
                n |= u32::from(val(*c)) << (18 - 6 * i);
            }
            let bytes = n.to_be_bytes();
            out.extend_from_slice(&bytes[1..chunk.len()]);
        }
        out
    }
}

async fn browse(b: Broker, console_port: u16, driver_port: u16, shots: bool) {
    const N: usize = 12;
    let fixed = Arc::new(AtomicBool::new(false));
    let handled: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let dead = Arc::new(AtomicI64::new(0));
    let (f, h, d) = (fixed.clone(), handled.clone(), dead.clone());
    let worker = Worker::builder_shared(b.transport.clone(), GROUP)
        .handle(move |_: Alpha, cx: Context| {
            let (f, h) = (f.clone(), h.clone());
            async move {
                if !f.load(Ordering::SeqCst) {
                    return Err(
                        HandlerError::msg(format!("no tax rate for order {}", cx.id())).permanent(),
                    );
                }
                h.lock().unwrap().insert(cx.id());
                Ok(())
            }
        })
        .on_outcome(move |p| {
            if matches!(p.outcome, steadfast::worker::Outcome::DeadLettered(_)) {
                d.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .expect("valid worker");
    let (stop, running) = start(worker).await;
    let envs: Vec<Envelope> = (0..N as u32)
        .map(|n| Envelope::encode(&Alpha { n }).unwrap())
        .collect();
    for r in b.transport.publish_batch(&envs).await {
        r.expect("published");
    }
    wait_for("every message dead-lettered", || {
        let n = dead.load(Ordering::SeqCst);
        async move { n == N as i64 }
    })
    .await;

    let console = ConsoleProcess::start(&b, console_port, TOKEN, &[]).await;

    let mut driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={driver_port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver must be installed: run scripts/install-chromium.sh (Debian's chromium and chromium-driver)");
    let mut out = BufReader::new(driver.stdout.take().unwrap()).lines();
    while !out
        .next_line()
        .await
        .unwrap()
        .expect("chromedriver starts")
        .contains("started successfully")
    {}
    let s = wd(
        driver_port,
        "POST",
        "/session",
        Some(serde_json::json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800"] }
        }}})),
    )
    .await;
    let br = Browser {
        port: driver_port,
        session: s["sessionId"]
            .as_str()
            .expect("a WebDriver session")
            .to_owned(),
        shots: shots
            .then(|| std::env::var_os("STEADFAST_CONSOLE_SCREENSHOTS").map(Into::into))
            .flatten(),
    };
    let base = format!("http://127.0.0.1:{console_port}");

    // Without the session: the login page. With the token: the failure groups.
    br.go(&format!("{base}/")).await;
    assert!(br.url().await.ends_with("/login"), "{}", br.url().await);
    br.shot("login").await;
    br.type_in("input[name=token]", TOKEN).await;
    br.click("button").await;
    let page = br.source().await;
    assert!(
        page.contains(&format!("<td class=\"count\">{N}</td>")),
        "{page}"
    );
    assert!(
        page.contains("no tax rate for order &lt;uuid&gt;"),
        "{page}"
    );
    br.shot("failure-groups").await;
    br.click("tr.failure-group a").await;
    assert_eq!(
        br.source().await.matches("class=\"dead-letter\"").count(),
        N
    );
    br.shot("dead-letters").await;
    br.click("tr.dead-letter a").await;
    assert!(br.source().await.contains("Edit and retry"));
    br.shot("dead-letter").await;

    // Replay by failure group from the page: dry run, then the confirmation.
    br.go(&format!("{base}/")).await;
    br.click("form[action$='/replay'] button").await;
    let page = br.source().await;
    assert!(
        page.contains(&format!("<strong class=\"selected\">{N}</strong>")),
        "{page}"
    );
    br.shot("replay-dry-run").await;
    assert_eq!(
        settled_count(&b).await,
        N as u64,
        "the dry run changed nothing"
    );
    fixed.store(true, Ordering::SeqCst);
    br.click("button.confirm").await;
    assert!(
        br.source()
            .await
            .contains(&format!("<strong class=\"done\">{N}</strong>"))
    );
    br.shot("replayed").await;
    wait_for("every replayed message handled", || {
        let n = handled.lock().unwrap().len();
        async move { n == N }
    })
    .await;
    assert_eq!(
        *handled.lock().unwrap(),
        envs.iter().map(|e| e.id).collect::<HashSet<_>>()
    );
    assert_eq!(settled_count(&b).await, 0);

    // Without the cookie, the pages send to the login again.
    wd(
        driver_port,
        "DELETE",
        &format!("/session/{}/cookie", br.session),
        None,
    )
    .await;
    br.go(&format!("{base}/g/{GROUP}")).await;
    assert!(br.url().await.ends_with("/login"));

    wd(
        driver_port,
        "DELETE",
        &format!("/session/{}", br.session),
        None,
    )
    .await;
    let _ = driver.start_kill();
    console.stop().await;
    stop.cancel();
    running.await.unwrap();
    b.transport.close().await;
    (b.cleanup)().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_on_rabbitmq() {
    browse(rabbitmq().await, 6211, 6213, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_on_nats() {
    browse(nats().await, 6212, 6214, false).await;
}
