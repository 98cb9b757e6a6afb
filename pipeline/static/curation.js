"use strict";
// The Duplicates view (/duplicates, from `fc7 duplicates`) and the Issues view (/issues, from
// `fc7 audit`): pages of thumbnails; clicking one searches from it.
(() => {
  const GROUPS_PER_PAGE = 10;
  const MEMBERS_SHOWN = 24;
  const ROWS_PER_PAGE = 50;
  const ISSUE_NAMES = { label: "label issues", outlier: "outliers", leak: "train/test leaks" };

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fixed(value, digits = 3) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  // A thumbnail that searches from its image when clicked (ids the index lacks cannot).
  function card(id, inIndex, className) {
    const button = element("button", className);
    button.type = "button";
    button.dataset.id = id;
    button.title = inIndex ? id : `${id} (not in the index)`;
    button.disabled = !inIndex;
    button.append(thumbnail(id, inIndex));
    button.addEventListener("click", () => searchId(id));
    return button;
  }

  function pager(prefix, offset, perPage, total, load) {
    const pages = Math.max(1, Math.ceil(total / perPage));
    const current = Math.floor(offset / perPage);
    $(`${prefix}-pager`).hidden = total <= perPage;
    $(`${prefix}-page`).textContent = `page ${current + 1} of ${pages}`;
    $(`${prefix}-prev`).disabled = current === 0;
    $(`${prefix}-next`).disabled = current >= pages - 1;
    $(`${prefix}-prev`).onclick = () => load(offset - perPage);
    $(`${prefix}-next`).onclick = () => load(offset + perPage);
  }

  async function fetchJson(url, status) {
    let response;
    try {
      response = await fetch(url);
    } catch (e) {
      status.textContent = `The server cannot be reached: ${e}`;
      status.classList.add("error");
      return null;
    }
    if (!response.ok) {
      status.textContent = `${response.status}: ${await errorText(response)}`;
      status.classList.add("error");
      return null;
    }
    status.classList.remove("error");
    return response.json();
  }

  // --- Duplicates ------------------------------------------------------------------------------

  let duplicatesShown = false;

  function member(found) {
    const figure = element("figure", "member" + (found.representative ? " representative" : ""));
    figure.append(card(found.id, found.in_index, "thumb"));
    const caption = element("figcaption");
    caption.append(element("span", "kind",
      found.representative ? "kept" : found.kind === "exact"
        ? "exact copy" : `near · ${fixed(found.similarity)}`));
    caption.append(element("span", "label", found.label || found.id));
    figure.append(caption);
    return figure;
  }

  async function loadDuplicates(offset) {
    const status = $("duplicates-status");
    const params = new URLSearchParams(
      { offset, limit: GROUPS_PER_PAGE, members: MEMBERS_SHOWN });
    const body = await fetchJson(`/duplicates?${params}`, status);
    if (!body) return;
    status.textContent = `${body.groups.toLocaleString()} groups of duplicates, `
      + `${body.images.toLocaleString()} images (${body.exact.toLocaleString()} exact copies, `
      + `${body.near.toLocaleString()} near copies`
      + (body.threshold !== null && body.threshold !== undefined
        ? ` at cosine ≥ ${body.threshold}` : "")
      + "); largest groups first.";
    const list = $("duplicates-list");
    list.replaceChildren();
    for (const group of body.results) {
      const article = element("article", "group");
      article.dataset.group = group.group;
      const shown = group.members.length;
      article.append(element("h3", "", `Group ${group.group} · ${group.size} images`
        + (shown < group.size ? ` (first ${shown} shown)` : "")));
      const row = element("div", "members");
      for (const found of group.members) row.append(member(found));
      article.append(row);
      list.append(article);
    }
    pager("duplicates", offset, GROUPS_PER_PAGE, body.groups, loadDuplicates);
    window.scrollTo(0, 0);
  }

  views.duplicates = {
    show() {
      if (!duplicatesShown) { duplicatesShown = true; loadDuplicates(0); }
    },
  };

  // --- Issues ----------------------------------------------------------------------------------

  let issuesShown = false;

  function issueRow(kind, found) {
    const row = element("div", "issue");
    row.dataset.id = found.id;
    row.append(card(found.id, found.in_index, "thumb"));
    const text = element("div", "text");
    text.append(element("strong", "id", found.id));
    if (kind === "leak") {
      text.append(element("span", "",
        `test image (${found.label || "no label"}) repeats training image ${found.leak_id} →`));
    } else {
      const changed = found.suggested_label && found.suggested_label !== found.label;
      const labels = element("span", changed ? "labels changed" : "labels");
      labels.append(element("span", "given", found.label || "no label"));
      if (changed) {
        labels.append(" → ", element("span", "suggested", found.suggested_label));
      }
      text.append(labels);
    }
    row.append(text);
    if (kind === "leak") {
      // The training image it repeats (an id of the index when it was built from training).
      if (found.score !== null) {
        row.append(element("span", "score", `similarity ${fixed(found.score, 4)}`));
      }
      row.append(card(found.leak_id, true, "thumb leak"));
    } else {
      const name = kind === "label" ? "label quality" : "outlier score";
      row.append(element("span", "score", `${name} ${fixed(found.score, 4)}`));
    }
    return row;
  }

  async function loadIssues(offset) {
    const kind = $("issue-kind").value;
    const status = $("issues-status");
    const params = new URLSearchParams({ kind, offset, limit: ROWS_PER_PAGE });
    const body = await fetchJson(`/issues?${params}`, status);
    if (!body || body.kind !== $("issue-kind").value) return; // another kind was chosen since
    for (const option of $("issue-kind").options) {
      option.textContent = `${ISSUE_NAMES[option.value]} (${body.counts[option.value]})`;
    }
    const order = kind === "leak" ? "" : ", most suspicious (lowest score) first";
    status.textContent = `${body.total.toLocaleString()} ${ISSUE_NAMES[kind]} among `
      + `${body.rows.toLocaleString()} audited images${order}.`;
    const list = $("issues-list");
    list.replaceChildren(...body.results.map((found) => issueRow(kind, found)));
    pager("issues", offset, ROWS_PER_PAGE, body.total, loadIssues);
    window.scrollTo(0, 0);
  }

  $("issue-kind").addEventListener("change", () => {
    history.replaceState(null, "", `#view=issues&kind=${$("issue-kind").value}`);
    loadIssues(0);
  });

  views.issues = {
    show() {
      if (issuesShown) return;
      issuesShown = true;
      const kind = new URLSearchParams(location.hash.slice(1)).get("kind");
      if (kind && ISSUE_NAMES[kind]) $("issue-kind").value = kind;
      loadIssues(0);
    },
  };
})();
