//! The router binary's start-up failures: clear messages and a non-zero exit
//! (the launcher relies on both), without any shard running.

use std::process::Command;

fn router() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_text-generation-router"));
    // Only the flags given here count, whatever the test's environment says.
    command.env_clear();
    command
}

fn default_model() -> String {
    format!("{}/../models/SmolLM2-135M-Instruct", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn unreachable_shard_is_a_clear_error() {
    let output = router()
        .args(["--model-path", &default_model(), "--master-shard-uds-path", "/nonexistent/shard-0", "--port", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot reach the shard at /nonexistent/shard-0"), "{stderr}");
}

#[test]
fn inconsistent_limits_are_refused_before_connecting() {
    let output = router()
        .args(["--model-path", &default_model(), "--max-input-tokens", "100", "--max-total-tokens", "100"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--max-input-tokens (100) must be < --max-total-tokens (100)"), "{stderr}");
}

#[test]
fn missing_model_is_a_clear_error() {
    let output = router().args(["--model-path", "/nonexistent/model"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("/nonexistent/model does not exist"), "{stderr}");
}
