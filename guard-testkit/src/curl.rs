//! curl as an MCP client: a JSON POST with MCP's Accept header.

/// Arguments for a JSON POST of `body` to `url` (`flags` such as `--http2` first); the output
/// ends with a line holding the HTTP status.
pub fn post_args(flags: &[&str], headers: &[&str], body: &str, url: &str) -> Vec<String> {
    let mut args: Vec<&str> = vec![
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    args.extend_from_slice(flags);
    args.extend([
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
    ]);
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", body, url]);
    args.into_iter().map(String::from).collect()
}

/// (status, body) of a [`post_args`] run's output.
pub fn parse(out: &str) -> (u16, String) {
    let (body, code) = out.rsplit_once('\n').expect("curl printed its status");
    (code.trim().parse().unwrap(), body.to_string())
}
