//! Tells the tests whether a PostgreSQL server was given to them, so that
//! those that need one show as ignored, with the reason, in the test
//! summary instead of passing without running. Under `CI=true` they run
//! (and fail without a server). Nothing else is built differently.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(outbox_no_test_server)");
    println!("cargo::rerun-if-env-changed=OUTBOX_TEST_POSTGRES");
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if std::env::var_os("OUTBOX_TEST_POSTGRES").is_none() && !ci {
        println!("cargo::rustc-cfg=outbox_no_test_server");
    }
}
