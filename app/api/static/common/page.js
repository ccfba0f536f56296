// What every Keel page does around its own content: error messages, connecting with an API key (the login form,
// "Forget key", a key the server stops accepting) and, on the live pages, refreshing every few seconds.

import { ApiError } from "./api.js";
import { $ } from "./dom.js";

const QUIET_CODES = ["invalid_request", "not_found"];

/**
 * An error as a person reads it. `codes`: add the API's error code when it says more than the message
 * (not for invalid_request / not_found); `forbidden`: appended to the message of a 403 (null: nothing).
 */
export function errorText(exc, { codes = true, forbidden = null } = {}) {
  if (exc instanceof ApiError) {
    const code = codes && exc.code && !QUIET_CODES.includes(exc.code) ? ` (${exc.code})` : "";
    if (exc.status === 401) return `${exc.message} — check the API key (Forget key, then connect again).`;
    if (exc.status === 403 && forbidden !== null) return `${exc.message}${code}${forbidden}`;
    return `${exc.message}${code}`;
  }
  return exc && exc.message ? exc.message : String(exc);
}

/**
 * The page's key login, on the shared login form (common/login.html) and session bar (common/topbar.html).
 *
 * - `session`: the page's API session (apiClient().session);
 * - `probe()`: the first read with a new key; it failing (a refused key) keeps the login form up, the key
 *   forgotten; its result goes to `onConnect(result, key)`, called once the app is shown;
 * - `onLogout()`: the page forgets what it shows (before the login form comes back);
 * - `errorText(exc)`: the page's error messages;
 * - `confirmLogout()`: whether "Forget key" may go ahead (unsaved work).
 *
 * Returns { connect(key), logout(reason), handleAuth(exc) (a 401: back to the login form with the reason; true
 * when it was one), start() (wires the form and "Forget key" and connects with a key the tab kept) }.
 */
export function keyLogin({ session, probe, onConnect, onLogout = () => {}, errorText: text = errorText,
  confirmLogout = () => true }) {
  async function connect(key) {
    session.key = key;
    let first;
    try {
      first = await probe();
    } catch (exc) {
      session.key = null;
      throw exc;
    }
    $("login").hidden = true;
    $("app").hidden = false;
    $("session").hidden = false;
    $("session-info").textContent = `Key ${key.slice(0, 9)}… · ${location.host}`;
    await onConnect(first, key);
  }

  function logout(reason = "") {
    session.key = null;
    onLogout();
    $("app").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    $("api-key").value = "";
    $("login-error").textContent = reason;
    $("api-key").focus();
  }

  function handleAuth(exc) {
    if (exc instanceof ApiError && exc.status === 401) {
      logout(`The server refused the key: ${exc.message}`);
      return true;
    }
    return false;
  }

  function start() {
    $("login-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      $("login-error").textContent = "";
      try {
        await connect(key);
      } catch (exc) {
        $("login-error").textContent = exc instanceof ApiError && exc.status === 401
          ? "The server does not accept this key." : text(exc);
      }
    });
    $("logout").addEventListener("click", () => {
      if (confirmLogout()) logout();
    });
    if (session.key) {
      connect(session.key).catch((exc) => logout(text(exc)));
    } else {
      logout();
    }
  }

  return { connect, logout, handleAuth, start };
}

/**
 * One read at a time: the returned `refresh()` joins the read under way, or starts `read()`; `refresh(true)` (after a
 * change) waits for the read under way and starts another, since that one may predate the change — unless another
 * began meanwhile, which is fresh enough. Errors are `read`'s to handle.
 */
export function coalesce(read) {
  let current = null;
  return async function refresh(force = false) {
    if (current) {
      if (!force) return current;
      await current;
      if (current) return current;
    }
    current = read().finally(() => {
      current = null;
    });
    return current;
  };
}

/**
 * Live refresh: `refresh()` every `everyMs` while the #live box is ticked and the tab is visible, at once when it
 * is ticked again or the tab comes back, and on #refresh. Returns { schedule() (start, or stop when unticked),
 * stop() }.
 */
export function liveRefresh(refresh, everyMs) {
  let timer = null;
  const stop = () => {
    clearInterval(timer);
    timer = null;
  };
  const schedule = () => {
    stop();
    if ($("live").checked) {
      timer = setInterval(() => {
        if (!document.hidden) refresh();
      }, everyMs);
    }
  };
  $("live-every").textContent = String(everyMs / 1000);
  $("refresh").addEventListener("click", () => refresh());
  $("live").addEventListener("change", () => {
    schedule();
    if ($("live").checked) refresh();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && $("live").checked) refresh();
  });
  return { schedule, stop };
}
