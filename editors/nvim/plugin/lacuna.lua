-- Commands only: the server starts when require("lacuna").setup() is called.
if vim.g.loaded_lacuna then
  return
end
vim.g.loaded_lacuna = true

vim.api.nvim_create_user_command("LacunaStatus", function()
  require("lacuna").status()
end, { desc = "Lacuna: server, model, device, last latency, acceptances" })

vim.api.nvim_create_user_command("LacunaToggle", function()
  require("lacuna").toggle()
end, { desc = "Lacuna: turn suggestions off or on" })
