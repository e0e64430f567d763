//! The two ways to Millrace's image stay one image: the Dockerfile's `runtime` stage (binaries
//! built from source in `rust:` images, for users who can pull) and
//! `deploy/docker/millrace.Dockerfile` (host-built binaries on the local Debian base, what CI
//! starts) must set up the same user, files, environment, ports, health check and command.
use millrace_testkit::workspace_root;

/// The lines of a stage that define the running container: from the user's creation to the
/// end, without the copies of the binaries and models (whose sources differ by design).
fn runtime_settings(stage: &str) -> Vec<String> {
    stage
        .lines()
        .skip_while(|line| !line.contains("groupadd"))
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            !(line.starts_with("COPY --from=") || line.starts_with("COPY bin/") || line.starts_with("COPY models/"))
        })
        .map(|line| line.replace("COPY deploy/docker/millrace-healthcheck", "COPY millrace-healthcheck"))
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_ci_image_sets_up_the_container_exactly_as_the_dockerfile_runtime_stage() {
    let dockerfile = read("Dockerfile");
    let start = dockerfile.find("AS runtime\n").expect("the Dockerfile has a runtime stage");
    let stage = &dockerfile[start..];
    let end = stage.find("\n# -----").unwrap_or(stage.len());
    let from_source = runtime_settings(&stage[..end]);

    let host = read("deploy/docker/millrace.Dockerfile");
    let from_host = runtime_settings(&host);

    assert!(from_source.len() > 10, "too little found in the runtime stage: {from_source:#?}");
    assert!(
        from_source.iter().any(|l| l.starts_with("HEALTHCHECK")) && from_source.iter().any(|l| l.starts_with("CMD")),
        "{from_source:#?}"
    );
    assert_eq!(from_source, from_host, "the runtime stage and deploy/docker/millrace.Dockerfile differ");
}

#[test]
fn the_settings_ignore_only_the_copies_of_binaries_and_models() {
    let stage = "RUN apt-get x \\\n && groupadd a\nCOPY --from=builder /out/ /usr/local/bin/\nCOPY bin/ /usr/local/bin/\nENV A=1\n";
    assert_eq!(runtime_settings(stage), [" && groupadd a", "ENV A=1"]);
    let changed = "RUN true \\\n && groupadd a\nENV A=2\n";
    assert_ne!(runtime_settings(stage), runtime_settings(changed), "a changed setting is a difference");
}
