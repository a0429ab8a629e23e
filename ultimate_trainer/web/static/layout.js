// The monitor page's panel layout: the cards of <main class="grid"> can be hidden, shown, reordered
// and made wide (two grid columns) or narrow, the choice is kept in this browser (localStorage "ut-layout", like the theme's
// "ut-theme"), and one button restores the page's own layout.
//
// Keyboard first: every action is a labelled button or checkbox (no drag), the control that moved a
// panel keeps the focus, and each change is announced to screen readers. Separate from app.js,
// which fills the panels and does not care where they are: it finds them by id.
"use strict";

const UTLayout = (() => {
  const KEY = "ut-layout";
  const grid = document.querySelector("main.grid");
  const cards = () => [...grid.children].filter(e => e.matches("section.card[id]"));
  const byId = id => document.getElementById(id);
  const DEFAULT = cards().map(c => c.id);  // the page's own order, before any saved layout is applied
  const DEFAULT_WIDE = cards().filter(c => c.classList.contains("span2")).map(c => c.id);

  // "📉 Loss" -> "Loss": the heading's own text, without the icon or the trend tag after it.
  function title(card) {
    const h = card.querySelector("h2");
    const own = h ? [...h.childNodes].filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.textContent).join(" ") : "";
    return own.replace(/^[^\p{L}\p{N}]+/u, "").replace(/\s+/g, " ").trim() || card.id;
  }

  // A saved layout against the panels this page has: unknown ids dropped, panels it does not know
  // (a newer page) put back after the panel that precedes them by default, at their default width.
  function normalize(saved) {
    const known = new Set(DEFAULT);
    const order = (Array.isArray(saved && saved.order) ? saved.order : []).filter(
      (id, i, a) => typeof id === "string" && known.has(id) && a.indexOf(id) === i);
    DEFAULT.forEach((id, i) => {
      if (order.includes(id)) return;
      const before = DEFAULT.slice(0, i).reverse().find(p => order.includes(p));
      order.splice(before === undefined ? 0 : order.indexOf(before) + 1, 0, id);
    });
    const hidden = (Array.isArray(saved && saved.hidden) ? saved.hidden : []).filter(id => known.has(id));
    const savedOrder = Array.isArray(saved && saved.order) ? saved.order : [];
    const wide = Array.isArray(saved && saved.wide)
      ? DEFAULT.filter(id => saved.wide.includes(id) || (!savedOrder.includes(id) && DEFAULT_WIDE.includes(id)))
      : [...DEFAULT_WIDE];
    return {order, hidden: [...new Set(hidden)], wide};
  }

  function load() {
    try { return normalize(JSON.parse(localStorage.getItem(KEY))); } catch (e) { return normalize(null); }
  }

  const isDefault = l => !l.hidden.length && l.order.every((id, i) => id === DEFAULT[i])
    && l.wide.length === DEFAULT_WIDE.length && l.wide.every(id => DEFAULT_WIDE.includes(id));

  function save(l) {
    try {
      if (isDefault(l)) localStorage.removeItem(KEY);
      else localStorage.setItem(KEY, JSON.stringify({version: 1, order: l.order, hidden: l.hidden, wide: l.wide}));
    } catch (e) { /* private mode: not remembered */ }
  }

  let layout = load();
  let empty = null;  // the note shown when every panel is hidden

  function apply() {
    for (const id of layout.order) grid.appendChild(byId(id));
    for (const c of cards()) {
      c.hidden = layout.hidden.includes(c.id);
      c.classList.toggle("span2", layout.wide.includes(c.id));
    }
    if (!empty) {
      empty = document.createElement("p");
      empty.id = "layout-empty";
      empty.className = "waiting";
      empty.textContent = "Every panel is hidden: ▦ Layout shows them again.";
    }
    grid.appendChild(empty);
    empty.hidden = layout.hidden.length < DEFAULT.length;
    const n = layout.hidden.length, count = byId("layout-count");
    count.textContent = n ? String(n) : "";
    count.hidden = !n;
    byId("layout").setAttribute("aria-label", n ? `Layout: ${n} panel${n > 1 ? "s" : ""} hidden` : "Layout");
    byId("layout").title = "Hide, show and reorder the panels (key L)" + (n ? `; ${n} hidden now` : "");
    // The charts size themselves on resize (app.js): one that was hidden has no width yet.
    window.dispatchEvent(new Event("resize"));
  }

  function announce(text) {
    byId("layout-status").textContent = text;
  }

  function change(update, message) {
    update();
    save(layout);
    apply();
    if (!byId("layout-panel").hidden) renderList();
    announce(message);
  }

  function move(id, delta) {
    const i = layout.order.indexOf(id), j = i + delta;
    if (j < 0 || j >= layout.order.length) return;
    change(() => { layout.order.splice(i, 1); layout.order.splice(j, 0, id); },
           `${title(byId(id))} moved to position ${j + 1} of ${layout.order.length}`);
    // Focus stays with the panel that moved: on the same arrow, or the other one at an end.
    const again = document.querySelector(`#layout-list button[data-panel="${id}"][data-move="${delta}"]`);
    const other = document.querySelector(`#layout-list button[data-panel="${id}"][data-move="${-delta}"]`);
    (again && !again.disabled ? again : other).focus();
  }

  function setShown(id, shown) {
    change(() => { layout.hidden = shown ? layout.hidden.filter(h => h !== id) : [...layout.hidden, id]; },
           `${title(byId(id))} ${shown ? "shown" : "hidden"}`);
  }

  function setWide(id, wide) {
    change(() => { layout.wide = wide ? DEFAULT.filter(p => p === id || layout.wide.includes(p))
                                      : layout.wide.filter(p => p !== id); },
           `${title(byId(id))} ${wide ? "wide" : "narrow"}`);
    byId("layout-wide-" + id).focus();
  }

  function button(text, label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.title = label;
    b.addEventListener("click", onClick);
    return b;
  }

  function renderList() {
    const list = byId("layout-list");
    list.replaceChildren(...layout.order.map((id, i) => {
      const name = title(byId(id)), li = document.createElement("li");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = "layout-show-" + id;
      box.checked = !layout.hidden.includes(id);
      box.addEventListener("change", () => {
        setShown(id, box.checked);
        byId("layout-show-" + id).focus();
      });
      const label = document.createElement("label");
      label.htmlFor = box.id;
      label.textContent = name;
      const up = button("↑", `Move ${name} up`, () => move(id, -1));
      const down = button("↓", `Move ${name} down`, () => move(id, 1));
      up.dataset.panel = down.dataset.panel = id;
      up.dataset.move = "-1";
      down.dataset.move = "1";
      up.disabled = i === 0;
      down.disabled = i === layout.order.length - 1;
      const isWide = layout.wide.includes(id);
      const wide = button("⇔", `Wide ${name}`, () => setWide(id, !isWide));
      wide.id = "layout-wide-" + id;
      wide.setAttribute("aria-pressed", String(isWide));
      wide.title = `${name}: ${isWide ? "wide (two columns); press for narrow" : "narrow (one column); press for wide"}`;
      li.classList.toggle("off", !box.checked);
      li.append(box, label, wide, up, down);
      return li;
    }));
    byId("layout-reset").disabled = isDefault(layout);
  }

  function open() {
    renderList();
    // Below the status bar, however many lines it wraps to (on a phone the panel sits at the bottom).
    byId("layout-panel").style.top = Math.round(byId("bar").getBoundingClientRect().bottom + 8) + "px";
    byId("layout-panel").hidden = false;
    byId("layout").setAttribute("aria-expanded", "true");
    byId("layout-list").querySelector("input").focus();
  }

  function close() {
    byId("layout-panel").hidden = true;
    byId("layout").setAttribute("aria-expanded", "false");
    byId("layout").focus();
  }

  function reset() {
    change(() => { layout = normalize(null); }, "Default layout restored: every panel shown, in the page's order");
    // The button is disabled now (nothing to restore): the focus goes to the list's first control.
    if (!byId("layout-panel").hidden) byId("layout-list").querySelector("input").focus();
  }

  function init() {
    // A small × on each card hides it at once; the Layout panel brings it back.
    for (const c of cards()) {
      const name = title(c);
      const hide = button("×", `Hide the ${name} panel`, () => {
        setShown(c.id, false);
        byId("layout").focus();
        announce(`${name} hidden; ▦ Layout shows it again`);
      });
      hide.className = "card-hide";
      c.prepend(hide);
    }
    byId("layout").addEventListener("click", () => (byId("layout-panel").hidden ? open() : close()));
    byId("layout-close").addEventListener("click", close);
    byId("layout-reset").addEventListener("click", reset);
    byId("layout-panel").addEventListener("keydown", e => {
      if (e.key === "Escape") { e.preventDefault(); close(); }
    });
    document.addEventListener("keydown", e => {
      if (e.ctrlKey || e.metaKey || e.altKey || /INPUT|TEXTAREA|SELECT/.test(e.target.tagName)) return;
      if (e.key === "l" || e.key === "L") { e.preventDefault(); byId("layout-panel").hidden ? open() : close(); }
    });
    apply();
  }

  init();
  return {DEFAULT, load, normalize};
})();
