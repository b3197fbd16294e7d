//! Writes a callback body of `--size` bytes to stdout: with `--cid CID` a complete document, with
//! `--template` the document with `@@CID@@` where the controlid goes (for the wrk scripts).
//!
//! `mkbody --size 4096 --template > post-4k.tpl`; `mkbody --size 52428800 --cid big-1 > big.xml`

use std::io::Write;

use callback_receiver_bench::{body, die, template, Args};

fn main() {
    let args = Args::parse();
    let size: usize = args.num("size", 4096);
    let bytes = if args.get("template", "false") == "true" {
        template(size).into_bytes()
    } else {
        body(size, &args.req("cid"))
    };
    std::io::stdout()
        .lock()
        .write_all(&bytes)
        .unwrap_or_else(|e| die(&e.to_string()));
}
