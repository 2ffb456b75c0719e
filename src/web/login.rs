//! The sign-in page: one field for a bearer token.

use std::fmt::Write;

use super::html::{Esc, page};

/// A form POSTing `token` to `/login`; `error` (if any) is shown above it.
pub fn login_page(error: Option<&str>) -> String {
    let mut main = String::new();
    main.push_str("<h1>Sign in</h1>\n");
    if let Some(error) = error {
        let _ = writeln!(
            main,
            "<p class=\"error\" role=\"alert\" id=\"login-error\">{}</p>",
            Esc(error)
        );
    }
    main.push_str(
        "<form class=\"login\" method=\"post\" action=\"/login\">\n\
         <p><label for=\"token\">Access token</label>\n",
    );
    let described = if error.is_some() {
        " aria-describedby=\"token-help login-error\""
    } else {
        " aria-describedby=\"token-help\""
    };
    let _ = writeln!(
        main,
        "<input id=\"token\" name=\"token\" type=\"password\" required autocomplete=\"off\" spellcheck=\"false\"{described}></p>"
    );
    main.push_str(
        "<p class=\"help\" id=\"token-help\">The token an administrator issued to you for \
         <code>phasegate serve</code>. It decides what you may do: read, approve, operate.</p>\n\
         <p><button type=\"submit\">Sign in</button></p>\n</form>\n",
    );
    page("Sign in", None, &main)
}
