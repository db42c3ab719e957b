// Progressive enhancement: without JS the tables are complete and readable; with it, headers sort and the
// controls above each table filter its rows by method family and by text.
(function () {
  "use strict";

  function sortKey(cell) {
    var value = cell.getAttribute("data-sort");
    return value === "" ? null : parseFloat(value);
  }

  function compare(a, b, index, ascending) {
    var x = sortKey(a.cells[index]), y = sortKey(b.cells[index]);
    if (x === null && y === null) {
      var s = a.cells[index].textContent.localeCompare(b.cells[index].textContent);
      return ascending ? s : -s;
    }
    if (x === null) return 1;   // cells without a number go last in both directions
    if (y === null) return -1;
    return ascending ? x - y : y - x;
  }

  function sortBy(table, header) {
    var index = parseInt(header.getAttribute("data-column"), 10);
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th[data-column]").forEach(function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    Array.prototype.slice.call(body.rows)
      .sort(function (a, b) { return compare(a, b, index, ascending); })
      .forEach(function (row) { body.appendChild(row); });
  }

  function applyFilters(tableId) {
    var table = document.getElementById(tableId);
    var family = document.querySelector('.family-filter[data-table="' + tableId + '"]').value;
    var text = document.querySelector('.text-filter[data-table="' + tableId + '"]').value.trim().toLowerCase();
    var shown = 0, rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      var visible = (!family || row.getAttribute("data-family") === family) &&
        (!text || row.cells[0].textContent.toLowerCase().indexOf(text) >= 0);
      row.hidden = !visible;
      if (visible) shown++;
    }
    document.querySelector('.shown[data-table="' + tableId + '"]').textContent = shown + " of " + rows.length + " rows";
  }

  document.querySelectorAll("table.leaderboard").forEach(function (table) {
    table.querySelectorAll("th[data-column]").forEach(function (header) {
      header.addEventListener("click", function () { sortBy(table, header); });
    });
    applyFilters(table.id);
  });
  document.querySelectorAll(".family-filter, .text-filter").forEach(function (control) {
    ["input", "change"].forEach(function (event) {
      control.addEventListener(event, function () { applyFilters(control.getAttribute("data-table")); });
    });
  });
  document.querySelectorAll(".controls").forEach(function (controls) { controls.hidden = false; });
})();
