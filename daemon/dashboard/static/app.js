// The dashboard's only script: confirmations, and "select all" in the outbox. The pages work without it.
document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
});
document.addEventListener("change", (event) => {
  if (!event.target.matches("input.all")) return;
  for (const box of event.target.closest("table").querySelectorAll("input[name=id]")) box.checked = event.target.checked;
});
