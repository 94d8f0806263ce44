//! Bad configs are refused with exit code 2 and messages that name the
//! file, the line and the field — all problems at once.

mod common;

use common::{Pool, stderr};

fn check(config: &str) -> (i32, String) {
    let pool = Pool::new("", "");
    std::fs::write(pool.config(), config).unwrap();
    let out = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    let start = pool.cli(&["start", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(
        start.status.code(),
        out.status.code(),
        "start and check disagree: {}",
        stderr(&start)
    );
    (out.status.code().unwrap_or(-1), stderr(&out))
}

#[test]
fn unknown_key_names_line_and_key() {
    let (code, err) = check("[pool]\ndb_path = \"j.db\"\n\n[[workers]]\nworker_type = \"notebook\"\ncuont = 2\n");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("pool.toml:6: workers[0].cuont: unknown key `cuont`"),
        "{err}"
    );
}

#[test]
fn bad_duration_names_line_and_key() {
    let (code, err) = check("[pool]\nheartbeat_timeout = \"30 parsecs\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pool.toml:2: pool.heartbeat_timeout:"), "{err}");
}

#[test]
fn docker_without_image_and_negative_count_are_both_reported() {
    let (code, err) = check(
        "[[workers]]\nworker_type = \"notebook\"\nexecution_mode = \"docker\"\n\n[[workers]]\nworker_type = \"plantuml\"\ncount = -1\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pool.toml:3: workers[0].image: missing"), "{err}");
    assert!(
        err.contains("pool.toml:7: workers[1].count: must be between 0 and 10000, got -1"),
        "{err}"
    );
    assert!(err.contains("2 problems"), "{err}");
}

#[test]
fn syntax_error_names_line() {
    let (code, err) = check("[pool]\ndb_path = \"j.db\"\nlog_level = info\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pool.toml:3"), "{err}");
}

#[test]
fn missing_config_file_is_a_config_error() {
    let pool = Pool::new("", "");
    let missing = pool.path("nope.toml");
    let out = pool.cli(&["start", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nope.toml: cannot read the config file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_reports_missing_commands_with_exit_1() {
    let pool = Pool::new(
        "",
        "[[workers]]\nworker_type = \"x\"\ncommand = [\"no-such-program-clx\"]\n",
    );
    let out = pool.cli(&["check", "--config", pool.config().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("command `no-such-program-clx` was not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_says_whether_the_api_certificate_names_the_advertised_host() {
    let pool = Pool::new(
        "",
        &common::sh_workers("copy", 1, "cp \"$CLX_INPUT_FILE\" \"$CLX_OUTPUT_FILE\""),
    );
    let openssl = |args: &str| {
        let out = std::process::Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(pool.path(""))
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args}: {}", stderr(&out));
    };
    openssl(
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=api \
         -addext subjectAltName=DNS:build1.example.org,IP:127.0.0.1 -keyout api.key -out api.crt",
    );
    let with = |advertise: &str| {
        let config = std::fs::read_to_string(pool.config()).unwrap();
        let config = config.replacen(
            "[pool]\n",
            &format!(
                "[pool]\napi_tls_cert = \"api.crt\"\napi_tls_key = \"api.key\"\napi_advertise = \"{advertise}\"\n"
            ),
            1,
        );
        let path = pool.path(&format!("check-{}.toml", advertise.len()));
        std::fs::write(&path, config).unwrap();
        pool.cli(&["check", "--config", path.to_str().unwrap()])
    };
    for named in ["https://build1.example.org:8765", "https://127.0.0.1:8765"] {
        let out = with(named);
        assert!(out.status.success(), "{named}: {}", stderr(&out));
        assert!(
            common::stdout(&out).contains("ok: the worker API's certificate names"),
            "{}",
            common::stdout(&out)
        );
    }
    let out = with("https://build2.example.org:8765/");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not name build2.example.org, the host of api_advertise"),
        "{}",
        stderr(&out)
    );
}
