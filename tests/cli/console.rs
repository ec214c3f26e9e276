//! `steadfast console` against real dead letters on RabbitMQ and NATS, driven over HTTP
//! as a browser would: the login, the token on every page and action, the CSRF token on
//! every form, secrets never shown, the failure groups' counts, a dry run that changes
//! nothing and a replay by failure group that brings every message back to the handler.

use super::*;

const TOKEN: &str = "console-test-token-0123456789";

/// One HTTP/1.1 request (connection closed after it): status, head, body.
pub(super) async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    super::http::request(port, method, path, headers, body, Duration::from_secs(60)).await
}

fn form_value<'a>(html: &'a str, name: &str) -> &'a str {
    let key = format!("name=\"{name}\" value=\"");
    let at = html
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} field in:\n{html}"))
        + key.len();
    &html[at..at + html[at..].find('"').unwrap()]
}

async fn console_over(b: Broker, port: u16) {
    const N: usize = 20;
    let _ = prometheus();
    let fixed = Arc::new(AtomicBool::new(false));
    let handled: Arc<Mutex<std::collections::HashMap<MessageId, u32>>> = Arc::default();
    let dead = Arc::new(AtomicI64::new(0));
    let (f, h, d) = (fixed.clone(), handled.clone(), dead.clone());
    let worker = Worker::builder_shared(b.transport.clone(), GROUP)
        .handle(move |m: Alpha, cx: Context| {
            let (f, h) = (f.clone(), h.clone());
            async move {
                if !f.load(Ordering::SeqCst) {
                    return Err(
                        HandlerError::msg(format!("no stock for order {}", cx.id())).permanent()
                    );
                }
                h.lock().unwrap().insert(cx.id(), m.n);
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
    let (ops_url, ops_stop) = ops_server(worker.status()).await;
    let (stop, running) = start(worker).await;
    let mut envs: Vec<Envelope> = (0..N as u32)
        .map(|n| Envelope::encode(&Alpha { n }).unwrap())
        .collect();
    envs[0].headers.insert("x-api-token", "s3cr3t-header-value");
    for r in b.transport.publish_batch(&envs).await {
        r.expect("published");
    }
    wait_for("every message dead-lettered", || {
        let n = dead.load(Ordering::SeqCst);
        async move { n == N as i64 }
    })
    .await;

    let audit_db = std::env::temp_dir().join(format!(
        "steadfast-console-{}.db",
        uuid::Uuid::now_v7().simple()
    ));
    // The audit trail and an outbox in a SQLite file of its own: one pending row, two
    // parked ones.
    let lite = steadfast::idempotency::sqlite::open(&audit_db)
        .await
        .expect("a SQLite file");
    let outbox = steadfast::outbox::SqliteOutbox::new(lite.clone());
    outbox.migrate().await.unwrap();
    let mut tx = lite.begin().await.unwrap();
    let parked = outbox.enqueue(&mut tx, &Alpha { n: 5 }).await.unwrap();
    let pending = outbox.enqueue(&mut tx, &Alpha { n: 6 }).await.unwrap();
    let doomed = outbox.enqueue(&mut tx, &Alpha { n: 7 }).await.unwrap();
    tx.commit().await.unwrap();
    for (id, error) in [
        (parked, "no route to <host>"),
        (doomed, "message too large"),
    ] {
        sqlx::query(
            "UPDATE steadfast_outbox SET state = 'parked', attempts = 9, last_error = ?2 WHERE id = ?1",
        )
        .bind(id.to_string())
        .bind(error)
        .execute(&lite)
        .await
        .unwrap();
    }
    let row_state = |id: MessageId| {
        let lite = lite.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM steadfast_outbox WHERE id = ?1")
                .bind(id.to_string())
                .fetch_optional(&lite)
                .await
                .unwrap()
        }
    };
    let console = ConsoleProcess::start(
        &b,
        port,
        TOKEN,
        &[
            "--sqlite".as_ref(),
            audit_db.as_os_str(),
            "--worker".as_ref(),
            ops_url.as_ref(),
            "--worker-every".as_ref(),
            "200ms".as_ref(),
        ],
    )
    .await;

    // Without the token: pages send to the login, actions are refused.
    let (s, head, _) = http(port, "GET", "/", &[], "").await;
    assert_eq!(s, 303, "{head}");
    assert!(head.contains("location: /login"), "{head}");
    let (s, _, _) = http(port, "POST", "/g/g/replay", &[], "name=cli.alpha").await;
    assert_eq!(s, 401);
    let (s, _, _) = http(
        port,
        "GET",
        "/",
        &[("Authorization", "Bearer wrong-token-wrong-token")],
        "",
    )
    .await;
    assert_eq!(s, 303);
    assert_eq!(settled_count(&b).await, N as u64);

    // With the token: one failure group of N (the order ids in the reasons masked).
    let bearer = format!("Bearer {TOKEN}");
    let (s, head, page) = http(port, "GET", "/", &[("Authorization", bearer.as_str())], "").await;
    assert_eq!(s, 200, "{page}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert_eq!(page.matches("class=\"failure-group\"").count(), 1, "{page}");
    assert!(
        page.contains(&format!("<td class=\"count\">{N}</td>")),
        "{page}"
    );
    assert!(page.contains("no stock for order &lt;uuid&gt;"), "{page}");
    // One dead letter in full: reason, body, the secret header masked.
    let (s, _, page) = http(
        port,
        "GET",
        &format!("/g/g/dl/{}", envs[0].id),
        &[("Authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(
        page.contains(&format!("no stock for order {}", envs[0].id)),
        "{page}"
    );
    assert!(page.contains("&quot;n&quot;: 0"), "{page}");
    assert!(
        page.contains("x-api-token") && page.contains("***"),
        "{page}"
    );
    assert!(!page.contains("s3cr3t-header-value"), "{page}");
    assert!(
        page.contains("class=\"as-of\""),
        "answered from the console's read: {page}"
    );

    // The login: a wrong token is refused; the right one sets a strict, HttpOnly cookie.
    let (s, _, _) = http(port, "POST", "/login", &[], "token=nope").await;
    assert_eq!(s, 401);
    let (s, head, _) = http(port, "POST", "/login", &[], &format!("token={TOKEN}")).await;
    assert_eq!(s, 303, "{head}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    assert!(
        cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"),
        "{cookie_line}"
    );
    let cookie = cookie_line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let with_cookie = [("Cookie", cookie.as_str())];
    let (s, _, page) = http(port, "GET", "/", &with_cookie, "").await;
    assert_eq!(s, 200);
    assert!(!page.contains(TOKEN), "the token is never rendered");
    let csrf = form_value(&page, "csrf").to_owned();
    let fp = form_value(&page, "group_id").to_owned();

    // A form without its CSRF token is refused, even with the session cookie.
    let (s, _, _) = http(
        port,
        "POST",
        "/g/g/replay",
        &with_cookie,
        &format!("group_id={fp}"),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _, _) = http(
        port,
        "POST",
        "/g/g/replay",
        &with_cookie,
        &format!("group_id={fp}&csrf=forged"),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(settled_count(&b).await, N as u64);

    // The dry run lists every id and changes nothing.
    let (s, _, page) = http(
        port,
        "POST",
        "/g/g/replay",
        &with_cookie,
        &format!("group_id={fp}&dry_run=1&csrf={csrf}"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    for e in &envs {
        assert!(
            page.contains(&format!("<li><code>{}</code></li>", e.id)),
            "{page}"
        );
    }
    assert_eq!(settled_count(&b).await, N as u64);
    assert!(handled.lock().unwrap().is_empty());

    // The fix. Edit and retry one: a preview changes nothing; the corrected copy, with a
    // new id, is handled with its new body and the dead letter is gone.
    fixed.store(true, Ordering::SeqCst);
    let edited = envs[1].id;
    let (s, _, page) = http(port, "GET", &format!("/g/g/dl/{edited}"), &with_cookie, "").await;
    assert_eq!(s, 200);
    assert!(page.contains("<textarea name=\"body\""), "{page}");
    let path = format!("/g/g/dl/{edited}/edit");
    let form = format!("body=%7B%22n%22%3A777%7D&csrf={csrf}");
    let (s, _, page) = http(
        port,
        "POST",
        &path,
        &with_cookie,
        &format!("{form}&dry_run=1"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("Would send"), "{page}");
    assert_eq!(settled_count(&b).await, N as u64);
    let (s, _, _) = http(port, "POST", &path, &with_cookie, "body=%7B%7D").await;
    assert_eq!(s, 403, "no CSRF token, no edit");
    let (s, _, page) = http(port, "POST", &path, &with_cookie, &form).await;
    assert_eq!(s, 200, "{page}");
    let key = "<code class=\"new-id\">";
    let at = page.find(key).expect("the new id") + key.len();
    let new_id: MessageId = page[at..at + 36].parse().unwrap();
    wait_for("the corrected copy handled", || {
        let got = handled.lock().unwrap().get(&new_id).copied();
        async move { got == Some(777) }
    })
    .await;
    assert_eq!(settled_count(&b).await, N as u64 - 1);
    // The console's read from before the edit no longer answers for it.
    let (s, _, page) = http(port, "GET", &format!("/g/g/dl/{edited}"), &with_cookie, "").await;
    assert_eq!(s, 404, "{page}");

    // The rest, replayed by failure group: every message back to the handler, once each.
    let (s, _, page) = http(
        port,
        "POST",
        "/g/g/replay",
        &with_cookie,
        &format!("group_id={fp}&csrf={csrf}"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(
        page.contains(&format!("<strong class=\"done\">{}</strong>", N - 1)),
        "{page}"
    );
    wait_for("every replayed message handled", || {
        let n = handled.lock().unwrap().len();
        async move { n == N }
    })
    .await;
    let mut expected: HashSet<MessageId> = envs.iter().map(|e| e.id).collect();
    expected.remove(&edited);
    expected.insert(new_id);
    let got: HashSet<MessageId> = handled.lock().unwrap().keys().copied().collect();
    assert_eq!(got, expected);
    assert_eq!(settled_count(&b).await, 0);

    // The audit trail shows both actions, newest first.
    let (s, _, page) = http(port, "GET", "/history", &with_cookie, "").await;
    assert_eq!(s, 200, "{page}");
    let replay_at = page
        .find("class=\"action\">replay")
        .expect("the replay recorded");
    let edit_at = page
        .find("class=\"action\">edit")
        .expect("the edit recorded");
    assert!(replay_at < edit_at, "{page}");

    // The outbox: counts, and the parked rows with their errors (escaped).
    let (s, _, page) = http(port, "GET", "/outbox", &with_cookie, "").await;
    assert_eq!(s, 200, "{page}");
    assert!(
        page.contains("<strong class=\"pending\">1</strong>"),
        "{page}"
    );
    assert!(
        page.contains("<strong class=\"parked\">2</strong>"),
        "{page}"
    );
    assert!(page.contains(&format!("<code>{parked}</code>")), "{page}");
    assert!(page.contains("no route to &lt;host&gt;"), "{page}");
    assert_eq!(page.matches("class=\"parked-row\"").count(), 2, "{page}");
    // Filtered by error: only the other one.
    let (_, _, page) = http(port, "GET", "/outbox?error=TOO+LARGE", &with_cookie, "").await;
    assert_eq!(page.matches("class=\"parked-row\"").count(), 1, "{page}");
    assert!(page.contains(&format!("<code>{doomed}</code>")), "{page}");

    // Retry one parked row: refused without the token or the CSRF token; the dry run
    // lists it and changes nothing; the confirmation puts it back in line, and an id
    // that is not parked is reported, not touched.
    let retry = format!("id={parked}&id={pending}");
    let (s, _, _) = http(port, "POST", "/outbox/retry", &[], &retry).await;
    assert_eq!(s, 401);
    let (s, _, _) = http(port, "POST", "/outbox/retry", &with_cookie, &retry).await;
    assert_eq!(s, 403);
    let (s, _, page) = http(
        port,
        "POST",
        "/outbox/retry",
        &with_cookie,
        &format!("{retry}&dry_run=1&csrf={csrf}"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(
        page.contains("<strong class=\"selected\">1</strong>"),
        "{page}"
    );
    assert!(page.contains(&format!("<code>{parked}</code>")), "{page}");
    assert_eq!(row_state(parked).await.as_deref(), Some("parked"));
    let (s, _, page) = http(
        port,
        "POST",
        "/outbox/retry",
        &with_cookie,
        &format!("{retry}&csrf={csrf}"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("<strong class=\"done\">1</strong>"), "{page}");
    assert!(
        page.contains(&format!("<li><code>{pending}</code></li>")),
        "{page}"
    );
    assert_eq!(row_state(parked).await.as_deref(), Some("pending"));
    assert_eq!(row_state(pending).await.as_deref(), Some("pending"));

    // Delete the other by its error, bearer token (no CSRF token needed): gone for good.
    let (s, _, page) = http(
        port,
        "POST",
        "/outbox/delete",
        &[("Authorization", bearer.as_str())],
        "error=too+large&dry_run=1",
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains(&format!("<code>{doomed}</code>")), "{page}");
    assert_eq!(row_state(doomed).await.as_deref(), Some("parked"));
    let (s, _, page) = http(
        port,
        "POST",
        "/outbox/delete",
        &[("Authorization", bearer.as_str())],
        "error=too+large",
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("<strong class=\"done\">1</strong>"), "{page}");
    assert_eq!(row_state(doomed).await, None);
    assert_eq!(row_state(pending).await.as_deref(), Some("pending"));
    let (_, _, page) = http(port, "GET", "/outbox", &with_cookie, "").await;
    assert!(
        page.contains("<strong class=\"pending\">2</strong>"),
        "{page}"
    );
    assert!(
        page.contains("<strong class=\"parked\">0</strong>"),
        "{page}"
    );

    // Both in the audit trail, with the rows they touched.
    let (_, _, page) = http(port, "GET", "/history", &with_cookie, "").await;
    assert!(page.contains("class=\"action\">delete-parked"), "{page}");
    assert!(page.contains("class=\"action\">retry-parked"), "{page}");
    assert!(page.contains("outbox:steadfast_outbox"), "{page}");
    lite.close().await;
    let _ = std::fs::remove_file(&audit_db);

    // The worker, read from its operations server: ready, connected, consuming, with the
    // N dead-lettered and N handled deliveries settled; then stopped, no longer consuming.
    let addr = ops_url.trim_start_matches("http://").to_owned();
    let workers = |want: Vec<String>| async move {
        let (_, _, page) = http(port, "GET", "/workers", &with_cookie, "").await;
        want.iter().all(|w| page.contains(w.as_str()))
    };
    let running_row = vec![
        format!("<td>{addr}</td><td class=\"group\">{GROUP}</td><td class=\"ready\">yes</td>"),
        "<td class=\"connected\">yes</td><td class=\"consuming\">yes</td>".to_owned(),
        "<td class=\"draining\">no</td><td class=\"kill-switch\">no</td>".to_owned(),
        format!("<td class=\"settled\">{}</td>", 2 * N),
        "<td class=\"rate\">0.0</td>".to_owned(),
    ];
    wait_for("the workers page shows the running worker", || {
        workers(running_row.clone())
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    wait_for("the workers page shows the worker stopped", || {
        workers(vec![
            "<td class=\"ready\">no</td><td class=\"state\">stopped</td>".to_owned(),
            "<td class=\"consuming\">no</td>".to_owned(),
        ])
    })
    .await;
    ops_stop.cancel();

    let log = console.stop().await;
    assert!(
        !log.iter().any(|l| l.contains(TOKEN)),
        "the token is never logged: {log:?}"
    );
    b.transport.close().await;
    (b.cleanup)().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_rabbitmq() {
    console_over(rabbitmq().await, 6201).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_nats() {
    console_over(nats().await, 6202).await;
}
